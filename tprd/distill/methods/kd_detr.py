"""KD-DETR: consistent distillation points (docs/methods.md#kd-detr; TPRD variant #tprd-variants).

Two extra query groups are decoded by both models, so student and teacher predictions of the same
point are index-aligned (query ``q`` of the student group <-> query ``q`` of the teacher group):

* **general** points, ``general`` in loss keys: a fresh table of ``G`` random queries per
  iteration, drawn from N(0, 1) with this method's own seeded generator under no-grad (docs/methods.md#diff-13),
  decoded by the teacher and by the student. What a point is depends on the detector family
  (``query_kind``):

  - ``"position"`` (Deformable DETR): ``[G, 2D]`` split into positional and content halves (detrex
    order: positional first); each model computes the 2-d reference points with **its own**
    reference-point layer (the reference's behaviour, docs/methods.md#diff-12). ``shared_general_refs=True``
    instead hands the teacher's references to the student.
  - ``"anchor"`` (DAB-DETR): ``[G, 4]`` un-sigmoided anchors (the decoder sees ``σ``), zero content.
  - ``"content_box"`` (DINO): ``[G, D]`` content and ``[G, 4]`` references; the references get ``σ``
    (clean, docs/methods.md#diff-11) unless ``raw_general_refs=True`` (the reference passes the raw N(0,1) values).

* **specific** points, ``specific`` in loss keys: the teacher's own initial queries/references
  (``teacher_out.taps["queries"]``), decoded by the student; their targets are the teacher's main
  predictions at the same stage. ``specific_content="own"`` (RT-DETR only, whose queries are
  selected encoder tokens): the student decodes the teacher's boxes with **its own** selected-query
  features at the teacher's selected tokens, instead of the teacher's feature vectors
  (docs/rt_detr.md#distillation).

Loss per stage ``l`` (student stage ``l`` <-> its paired teacher stage, ``l`` for equal depths,
docs/methods.md#stage-pairing), per group: B5
(:func:`~tprd.distill.losses.kd_detr_weighted_losses`): ``T²·KL`` (T = ``temperature``), L1 and
``1 − GIoU``, each weighted by ``σ(max_c teacher logit)`` normalised per image, summed, ``/ B``.

With ``refine=True`` (KD-DETR_TPRD) the specific group's targets are the TPRD-refined teacher
predictions of stage ``l`` (B1 matching ``M_l`` of the raw teacher stage ``l``), the class term is
TPRD-CKD (T = 1; positives = teacher queries in ``M_l``), and the point weights come from the
refined logits. The general group is unchanged.

Query counts: the general group has ``G`` points in both models and the specific group has the
teacher's query count in both, so any student/teacher query counts work.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from tprd.distill.losses import kd_detr_weighted_losses
from tprd.distill.tprd import aligned_positive_targets, tprd_class_kd
from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import QueryGroup, StagePredictions

from .base import DistillContext, DistillMethod, TPRDOptions, query_group_from_tap
from .common import check_same_stages, check_same_width, paired_stages, tprd_refine_and_targets, tprd_stats

__all__ = ["KDDETR", "general_point_kind"]

QUERY_KINDS = ("position", "anchor", "content_box")


def general_point_kind(model: DETRDetector) -> str:
    """The detector's :attr:`~tprd.modeling.detector.DETRDetector.query_kind`, checked to be one
    KD-DETR can draw general points for."""
    kind = model.query_kind
    if kind == "proposal":
        raise ValueError(
            "KD-DETR general points need the model's own reference-point layer, which two-stage "
            "Deformable DETR does not have; use a single-stage Deformable DETR"
        )
    if kind not in QUERY_KINDS:
        raise ValueError(f"{model.family}.query_kind = {kind!r}; expected one of {QUERY_KINDS}")
    return kind


class KDDETR(DistillMethod):
    """KD-DETR with optional TPRD on the specific group.

    Args:
        weights: ``general_{class,l1,giou}`` and ``specific_{class,l1,giou}``. Default: the
            Deformable DETR values 2 / 5 / 2 for both groups.
        general_points: ``G``; 0 disables the general group (its terms are then not returned).
        temperature: ``T`` of the class KL (10).
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD on the specific group.
        matcher: B1 matcher for TPRD (default focal Hungarian 2 / 5 / 2).
        skip_empty_images: TPRD parity flag (docs/methods.md#diff-5).
        raw_general_refs: DINO parity flag: random references not passed through ``σ`` (docs/methods.md#diff-11).
        shared_general_refs: Deformable DETR: the student uses the teacher's general reference points
            instead of computing its own (docs/methods.md#diff-12, optional mode).
        query_kind: force ``"position"`` / ``"anchor"`` / ``"content_box"`` (default: the models'
            declared ``query_kind``).
        seed: seed of the general-point generator. In training (the Distiller's ``iteration`` set
            by the trainer) the points of iteration ``i`` on process ``r`` come from a generator
            seeded from ``(seed, i, r)`` (as MGD's masks), so every GPU draws different points and
            a resumed run draws the points of the uninterrupted one; without an iteration, one
            generator seeded from ``(seed, rank)`` is drawn from call after call.
        specific_content: ``"teacher"`` (the teacher's query content vectors, the reference's
            way) or ``"own"`` (RT-DETR: the student's own features at the teacher's selected tokens).
        alpha, beta: TPRD-CKD weights of TCKD / NCKD (1, 1).
    """

    name = "kd_detr"
    terms = ("general_class", "general_l1", "general_giou", "specific_class", "specific_l1", "specific_giou")
    needs = ("predictions", "queries")

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        general_points: int = 300,
        temperature: float = 10.0,
        raw_general_refs: bool = False,
        shared_general_refs: bool = False,
        query_kind: Optional[str] = None,
        seed: int = 0,
        specific_content: str = "teacher",
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            weights = {t: {"class": 2.0, "l1": 5.0, "giou": 2.0}[t.split("_")[1]] for t in self.terms}
        super().__init__(weights, name)
        if general_points < 0:
            raise ValueError(f"general_points must be >= 0, got {general_points}")
        if query_kind is not None and query_kind not in QUERY_KINDS:
            raise ValueError(f"query_kind must be one of {QUERY_KINDS}, got {query_kind!r}")
        self.general_points = int(general_points)
        self.temperature = float(temperature)
        self.tprd = TPRDOptions(**tprd)
        self.raw_general_refs = bool(raw_general_refs)
        self.shared_general_refs = bool(shared_general_refs)
        self.query_kind = query_kind
        self.seed = int(seed)
        if specific_content not in ("teacher", "own"):
            raise ValueError(f"specific_content must be 'teacher' or 'own', got {specific_content!r}")
        self.specific_content = specific_content
        self._generator: Optional[torch.Generator] = None
        self._general: Optional[QueryGroup] = None
        self._embed_dim: Optional[int] = None

    # ------------------------------------------------------------------ setup
    def check_models(self, student: DETRDetector, teacher: DETRDetector) -> None:
        if self.query_kind is None:
            ks, kt = general_point_kind(student), general_point_kind(teacher)
            if ks != kt:
                raise ValueError(f"KD-DETR needs a student and teacher of one family; got query kinds {ks!r} and {kt!r}")
            self.query_kind = kt
        self._embed_dim = check_same_width(
            student, teacher, "KD-DETR feeds the teacher's queries to the student, but their widths differ "
            "({dt} vs {ds}); use the same transformer embed_dim")
        check_same_stages(student, teacher, "KD-DETR")
        if self.shared_general_refs and self.query_kind != "position":
            raise ValueError("shared_general_refs only applies to Deformable DETR (query_kind 'position')")

    def _rng(self, iteration: Optional[int] = None) -> torch.Generator:
        from tprd.utils import comm

        if iteration is not None:
            from .mgd import mask_seed

            # salted: a config with KD-DETR and MGD on one seed gets unrelated streams
            return torch.Generator().manual_seed(mask_seed(self.seed, iteration, comm.get_rank()) ^ 0x2545F4914F6CDD1D)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed + 1_000_003 * comm.get_rank())
        return self._generator

    @torch.no_grad()
    def sample_general_points(self, device: torch.device, dtype=torch.float32,
                              iteration: Optional[int] = None) -> QueryGroup:
        """One fresh table of general points (no autograd history), on ``device``: those of training
        iteration ``iteration`` on this process, or the next of the call-after-call stream."""
        if self._embed_dim is None or self.query_kind is None:
            raise RuntimeError("KDDETR.check_models must run first (the Distiller calls it)")
        g, d, rng = self.general_points, self._embed_dim, self._rng(iteration)
        name = self.group_name("general")
        if self.query_kind == "position":
            z = torch.randn(g, 2 * d, generator=rng).to(device=device, dtype=dtype)
            position, content = z[:, :d], z[:, d:]
            return QueryGroup(name, content, None, position)
        if self.query_kind == "anchor":
            anchors = torch.randn(g, 4, generator=rng).to(device=device, dtype=dtype)
            return QueryGroup(name, anchors.new_zeros(g, d), anchors.sigmoid())
        content = torch.randn(g, d, generator=rng).to(device=device, dtype=dtype)
        ref = torch.randn(g, 4, generator=rng).to(device=device, dtype=dtype)
        return QueryGroup(name, content, ref if self.raw_general_refs else ref.sigmoid())

    # ------------------------------------------------------------------ query groups
    def teacher_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        self._general = None
        if self.general_points == 0:
            return []
        self._general = self.sample_general_points(ctx.device, ctx.images.tensor.dtype, ctx.iteration)
        return [self._general]

    def student_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        groups = []
        if self._general is not None:
            general = self._general
            if self.shared_general_refs:
                # the reference the teacher's first decoder layer received ([L,B,G,2] or a list)
                first = ctx.teacher_out.groups[general.name].references[0]
                general = QueryGroup(general.name, general.content, first.detach(), general.position)
            groups.append(general)
        tap = ctx.teacher_out.taps.get("queries")
        if tap is None:
            raise KeyError("KD-DETR needs the teacher's initial queries (taps['queries']); the teacher detector does not expose them")
        groups.append(query_group_from_tap(tap, self.group_name("specific"), ctx.batch_size, self._embed_dim,
                                           own_content=self.specific_content == "own"))
        return groups

    # ------------------------------------------------------------------ losses
    def _b5(self, s: StagePredictions, t_logits: Tensor, t_boxes: Tensor, class_loss: Optional[Tensor] = None):
        """B5 at every stage -> ``{"class", "l1", "giou"}`` of shape ``[L]``."""
        if s.logits.shape[:3] != t_logits.shape[:3]:
            raise ValueError(
                f"KD-DETR groups are index-aligned: student {tuple(s.logits.shape[:3])} vs teacher "
                f"{tuple(t_logits.shape[:3])} (stages, images, queries) must agree"
            )
        # all stages at once: [L,B,Q,*] in, [L] per term out
        return kd_detr_weighted_losses(
            s.logits, t_logits, s.boxes, t_boxes, self.temperature, class_loss=class_loss
        )

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        s_out, t_out = ctx.student_out, ctx.teacher_out
        if self._general is not None:
            gs = s_out.groups[self._general.name]
            gt = paired_stages(t_out.groups[self._general.name], ctx.teacher_stages)
            for k, v in self._b5(gs, gt.logits.detach(), gt.boxes.detach()).items():
                out[f"general_{k}"] = v

        spec = s_out.groups[self.group_name("specific")]
        teacher = t_out.main
        if not self.tprd.refine:
            teacher = paired_stages(teacher, ctx.teacher_stages)
            terms = self._b5(spec, teacher.logits.detach(), teacher.boxes.detach())
        else:
            logits, boxes, match_index, labels_pad, stats = tprd_refine_and_targets(
                ctx, teacher, self.tprd, key="main", stages=ctx.teacher_stages
            )
            num_stages, batch, nq, num_classes = logits.shape
            positive, cls = aligned_positive_targets(
                match_index.flatten(0, 1), labels_pad.repeat(num_stages, 1)
            )
            ckd = tprd_class_kd(
                spec.logits.reshape(-1, num_classes), logits.reshape(-1, num_classes),
                positive.reshape(-1), cls.reshape(-1), alpha=self.tprd.alpha, beta=self.tprd.beta,
                form=self.tprd.class_kd,
            ).view(num_stages, batch, nq)
            terms = self._b5(spec, logits, boxes, class_loss=ckd)
            self.last_stats = tprd_stats(f"tprd_{self.name}_specific", stats)
        for k, v in terms.items():
            out[f"specific_{k}"] = v
        return out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, general_points={self.general_points}, temperature={self.temperature}, "
            f"refine={self.tprd.refine}, query_kind={self.query_kind!r}, specific_content={self.specific_content!r}, "
            f"weights={self.weights}"
        )
