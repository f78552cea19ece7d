"""The plug-in interface of distillation methods.

A method is a small ``nn.Module`` (it may own trainable adapters) that the
:class:`~tprd.distill.distiller.Distiller` calls at three points of an iteration::

    groups_t = method.teacher_query_groups(ctx)     # extra queries the teacher decodes (KD-DETR points)
    teacher forward (no grad) -> ctx.teacher_out
    groups_s = method.student_query_groups(ctx)     # extra queries the student decodes
    student forward           -> ctx.student_out
    raw = method.losses(ctx)                        # {term: per-stage [L] tensor or scalar}

``needs`` declares how far the teacher must run (see :data:`TEACHER_NEEDS`): a method that needs
only ``"neck"`` lets the distiller stop the teacher after its neck.

Loss terms come back **unweighted**: ``{term: Tensor}`` where a 1-d tensor of length ``L`` holds
one value per decoder stage (index ``L-1`` = final stage) and a 0-d tensor is a stage-free term.
The distiller multiplies each by ``method.weights[term]`` (the same weight at every stage,
docs/methods.md#conventions) and names them (see :func:`expand_stage_terms`)::

    distill_<method>_<term>          final stage (or a stage-free term)
    distill_<method>_<term>_<l>      stage l = 0 .. L-2 (0-based, the reference's ``_0 .. _4``)

Diagnostics that are not losses (e.g. TPRD refinement shares) go to ``method.last_stats`` with
the same naming scheme (``tprd_<method>_<group>_<stat>[_<l>]``); the distiller hands them to the
trainer through the event storage (:mod:`tprd.utils.events`), never in the loss dict.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions


__all__ = [
    "TEACHER_NEEDS",
    "STUDENT_NEEDS",
    "FEATURE_NEEDS",
    "DistillContext",
    "DistillMethod",
    "TPRDOptions",
    "stage_suffix",
    "expand_stage_terms",
    "query_group_from_tap",
]

Match = Tuple[Tensor, Tensor]

#: What a method may ask of the teacher. ``predictions``/``hidden``/``queries``/``memory`` need the
#: full forward (decoder included); ``backbone``/``neck`` only the feature extractor;
#: ``attention`` the per-layer decoder attention taps (``return_attention=True``, see
#: :mod:`tprd.distill.attention`).
TEACHER_NEEDS = frozenset({"predictions", "hidden", "queries", "memory", "backbone", "neck", "attention"})
#: What a method may ask of the student beyond its ordinary training forward.
STUDENT_NEEDS = frozenset({"attention"})
FEATURE_NEEDS = frozenset({"backbone", "neck"})


def stage_suffix(l: int, num_stages: int) -> str:
    """``""`` for the final stage ``L-1``, ``"_l"`` for stage ``l < L-1`` (0-based)."""
    return "" if l == num_stages - 1 else f"_{l}"


def expand_stage_terms(prefix: str, values: Mapping[str, Tensor], weights: Optional[Mapping[str, float]] = None) -> Dict[str, Tensor]:
    """``{term: [L] | scalar}`` -> flat ``{prefix_term[_l]: scalar}`` (optionally multiplied by
    ``weights[term]``). Order: for each term, the final stage first, then stages ``0 .. L-2``."""
    out: Dict[str, Tensor] = {}
    for term, value in values.items():
        w = None if weights is None else weights[term]
        if value.dim() == 0:
            out[f"{prefix}_{term}"] = value if w is None else value * w
            continue
        if value.dim() != 1:
            raise ValueError(f"term {term!r}: expected a scalar or a per-stage [L] tensor, got shape {tuple(value.shape)}")
        num_stages = value.shape[0]
        for l in [num_stages - 1] + list(range(num_stages - 1)):
            v = value[l]
            out[f"{prefix}_{term}{stage_suffix(l, num_stages)}"] = v if w is None else v * w
    return out


class DistillContext:
    """Everything a method sees during one training iteration.

    Attributes:
        images: the shared normalised, padded batch (:class:`ImageBatch`).
        targets: per image ``{"labels" [G], "boxes" [G,4] normalised cxcywh}``.
        student, teacher: the two detectors.
        teacher_out, student_out: :class:`DetectorOutputs` (set by the distiller; ``teacher_out`` is
            ``None`` when no method needs the teacher).
        iteration: the training iteration (the event storage's ``iter`` while a trainer runs), else
            ``None``.
        teacher_stages: the teacher stage paired with each student stage (``[Ls]``, 0-based;
            docs/methods.md#stage-pairing), or ``None`` when stage ``l`` pairs with stage ``l``.
            Methods cut teacher stacks with :func:`~.common.paired_stages`.
    """

    def __init__(
        self,
        images: ImageBatch,
        targets: Sequence[Dict[str, Tensor]],
        student: nn.Module,
        teacher: nn.Module,
        timings: Optional[Dict[str, float]] = None,
        iteration: Optional[int] = None,
        teacher_stages: Optional[Sequence[int]] = None,
    ):
        self.images = images
        self.targets = list(targets)
        self.student = student
        self.teacher = teacher
        self.teacher_stages = None if teacher_stages is None else [int(s) for s in teacher_stages]
        self.teacher_out: Optional[DetectorOutputs] = None
        self.student_out: Optional[DetectorOutputs] = None
        self.iteration = iteration
        self._timings = timings
        self._cache: Dict[Any, Any] = {}

    # ------------------------------------------------------------------ ground truth
    @property
    def batch_size(self) -> int:
        return int(self.images.tensor.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.tensor.device

    @property
    def gt_labels(self) -> List[Tensor]:
        return [t["labels"] for t in self.targets]

    @property
    def gt_boxes(self) -> List[Tensor]:
        return [t["boxes"] for t in self.targets]

    def num_boxes(self) -> float:
        """The all-reduced GT count of the batch (B2's ``num_boxes``), computed once."""
        if "num_boxes" not in self._cache:
            from tprd.modeling.criterion import get_num_boxes

            self._cache["num_boxes"] = get_num_boxes(self.targets, self.device)
        return self._cache["num_boxes"]

    def teacher_gt_matches(self, preds: StagePredictions, matcher: nn.Module, key: str) -> List[List[Match]]:
        """B1 matches ``M_l`` of every stage of ``preds`` to the GT, ``[L][B] (query_idx, gt_idx)``,
        computed once per (``key``, matcher configuration) and shared by whoever asks again in this
        iteration (two methods with equally configured matchers share one matching)."""
        config = matcher.extra_repr() if isinstance(matcher, nn.Module) else ""
        cache_key = ("teacher_gt_matches", key, type(matcher).__qualname__, config or id(matcher))
        if cache_key not in self._cache:
            with self.section("matching"):
                self._cache[cache_key] = matcher.match_stages(preds.logits.detach(), preds.boxes.detach(), self.targets)
        return self._cache[cache_key]

    # ------------------------------------------------------------------ profiling
    def section(self, name: str):
        """Context manager adding the wall time of its body to ``timings[name]`` when profiling
        (``Distiller(profile=True)``); a no-op otherwise."""
        if self._timings is None:
            return nullcontext()
        return _timed(self._timings, name, self.device)


@contextmanager
def _timed(store: Dict[str, float], name: str, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        store[name] = store.get(name, 0.0) + time.perf_counter() - start


@dataclass
class TPRDOptions:
    """The TPRD switch of a prediction-level method and the options that go with it.

    Attributes:
        refine: distil towards the TPRD-refined teacher (the ``_TPRD`` configs) with TPRD-CKD as
            the class term; ``False``: the method as published.
        matcher: the teacher-to-GT matcher ``M_l`` of the refinement; ``None``: focal Hungarian with
            costs class 2, L1 5, GIoU 2.
        skip_empty_images: leave an image without GT out of the refinement, as the reference does
            (docs/methods.md#diff-5).
        alpha, beta: TPRD-CKD weights of its target-class and non-target-class parts.
        soft_costs: ``(class, L1, GIoU)`` costs of the soft student-teacher matcher (used by the
            methods that soft-match).
        class_kd: the form of the class KD with ``refine``, one of
            :data:`tprd.distill.tprd.CLASS_KD_FORMS`: ``"decoupled"`` (TPRD-CKD, the reference's),
            ``"sigmoid"`` or ``"decoupled+bce"`` (ours; docs/methods.md#class-kd-forms).
    """

    refine: bool = False
    matcher: Optional[nn.Module] = None
    skip_empty_images: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    soft_costs: Tuple[float, float, float] = (1.0, 5.0, 2.0)
    class_kd: str = "decoupled"

    def __post_init__(self) -> None:
        from tprd.distill.tprd import CLASS_KD_FORMS

        if self.class_kd not in CLASS_KD_FORMS:
            raise ValueError(f"class_kd must be one of {CLASS_KD_FORMS}, got {self.class_kd!r}")
        self.refine = bool(self.refine)
        if self.matcher is None:
            from tprd.modeling.matcher import HungarianMatcher

            self.matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
        self.skip_empty_images = bool(self.skip_empty_images)
        self.alpha = float(self.alpha)
        self.beta = float(self.beta)
        if len(self.soft_costs) != 3:
            raise ValueError(f"soft_costs must be (class, l1, giou), got {self.soft_costs}")
        self.soft_costs = tuple(float(c) for c in self.soft_costs)


class DistillMethod(nn.Module):
    """Base class of a distillation method.

    Subclasses set :attr:`name` (used in loss keys), :attr:`terms` (every loss term the method can
    return) and :attr:`needs`, and override :meth:`losses` and, where they add queries,
    :meth:`teacher_query_groups` / :meth:`student_query_groups`.

    Args:
        weights: ``{term: weight}``; must name every term in :attr:`terms` (a typo is an error, not a
            silently unweighted loss).
        name: overrides the class's :attr:`name` (two instances of one method in one distiller).
    """

    name: str = "method"
    terms: Tuple[str, ...] = ()
    needs: Tuple[str, ...] = ("predictions",)
    #: ``("attention",)``: the student's forward also returns its decoder attention taps.
    student_needs: Tuple[str, ...] = ()
    #: ``True`` for methods that pair student query ``q`` with teacher query ``q`` of the *main*
    #: groups and hence need equal query counts.
    requires_equal_queries: bool = False
    #: ``True`` for a method whose loss back-propagates through the frozen teacher (CrossKD): it runs
    #: that teacher pass itself, with autograd on, inside :meth:`losses`.
    grad_through_teacher: bool = False
    #: How the reference implementation names this method's own modules in a distiller checkpoint
    #: (its ``distill_criterion.*`` keys, prefix removed): ``(regex, replacement)`` pairs tried in
    #: order by :meth:`convert_reference_state_dict`. Empty for methods without trainable modules.
    reference_key_rules: Tuple[Tuple[str, str], ...] = ()
    #: A prediction-level method's TPRD switch and options (:class:`TPRDOptions`);
    #: ``None`` for a method without a TPRD variant (FGD, FitNet, MGD).
    tprd: Optional[TPRDOptions] = None

    def __init__(self, weights: Optional[Mapping[str, float]] = None, name: Optional[str] = None):
        super().__init__()
        if name is not None:
            self.name = str(name)
        if not self.name.replace("_", "a").isalnum():
            raise ValueError(f"method name {self.name!r} must be alphanumeric/underscore (it is part of loss keys)")
        bad_needs = set(self.needs) - TEACHER_NEEDS
        if bad_needs:
            raise ValueError(f"{type(self).__name__}.needs has unknown entries {sorted(bad_needs)}; known: {sorted(TEACHER_NEEDS)}")
        bad_needs = set(self.student_needs) - STUDENT_NEEDS
        if bad_needs:
            raise ValueError(
                f"{type(self).__name__}.student_needs has unknown entries {sorted(bad_needs)}; known: {sorted(STUDENT_NEEDS)}"
            )
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.terms))
        missing = sorted(set(self.terms) - set(weights))
        if unknown or missing:
            from tprd.errors import SetupError

            raise SetupError(
                f"{type(self).__name__} weights: unknown terms {unknown}, missing terms {missing}; "
                f"expected exactly {list(self.terms)}"
            )
        self.weights: Dict[str, float] = {k: float(v) for k, v in weights.items()}
        self.last_stats: Dict[str, Tensor] = {}

    # ------------------------------------------------------------------ hooks
    def check_models(self, student: DETRDetector, teacher: DETRDetector) -> None:
        """Raise a clear error at construction when this teacher/student pair cannot work (read the
        models through their declared interface, :class:`~tprd.modeling.detector.DETRDetector`)."""

    def convert_reference_state_dict(self, state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
        """The reference's ``distill_criterion.*`` entries (prefix removed) in this method's names:
        ``(converted, unknown_keys)``, renamed by :attr:`reference_key_rules` (first match wins)."""
        converted: Dict[str, Tensor] = {}
        unknown: List[str] = []
        for key, value in state_dict.items():
            for pattern, replacement in self.reference_key_rules:
                new, hits = re.subn(pattern, replacement, key, count=1)
                if hits:
                    converted[new] = value
                    break
            else:
                unknown.append(key)
        return converted, unknown

    def teacher_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        """Extra query groups the teacher decodes (before the teacher forward)."""
        return []

    def student_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        """Extra query groups the student decodes (after the teacher forward)."""
        return []

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        """Unweighted ``{term: [L] | scalar}``; see the module docstring."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def refine(self) -> bool:
        """Whether this method distils towards the TPRD-refined teacher."""
        return self.tprd is not None and self.tprd.refine

    def group_name(self, local: str) -> str:
        """Namespaced query-group name ``<method>/<local>`` (unique across methods)."""
        return f"{self.name}/{local}"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights}"


def _as_batched(x: Tensor, batch: int) -> Tensor:
    return x if x.dim() == 3 else x.unsqueeze(0).expand(batch, *x.shape)


def query_group_from_tap(tap: Any, name: str, batch: int, embed_dim: Optional[int] = None,
                         own_content: bool = False) -> QueryGroup:
    """A detector's ``taps["queries"]`` (its own initial queries/references) as a :class:`QueryGroup`
    called ``name`` that another model of the same family can decode.

    ``own_content``: the group carries the tap's ``token_index`` and no content, so the decoding
    model takes its own selected-query features at those encoder tokens (RT-DETR, whose queries are
    selected tokens; :class:`~tprd.modeling.outputs.QueryGroup`) instead of the tap's content vectors.

    Accepts a :class:`QueryGroup`, a mapping with ``content``/``reference`` (``position``
    optional; ``references`` and ``query_pos`` are accepted aliases), or a bare ``[B?,Q,4]``
    anchor tensor (DAB-DETR: zero content vectors of width ``embed_dim``).
    Tensors are detached: the student never back-propagates into the teacher.
    """
    if isinstance(tap, QueryGroup):
        content, reference, position = tap.content, tap.reference, tap.position
    elif isinstance(tap, Mapping):
        content = tap.get("content")
        reference = tap.get("reference", tap.get("references"))
        position = tap.get("position", tap.get("query_pos"))
    elif isinstance(tap, Tensor):
        content, reference, position = None, tap, None
    else:
        raise TypeError(f"cannot turn a {type(tap).__name__} queries tap into a query group")
    if reference is None:
        raise ValueError("the teacher's queries tap has no reference points/boxes")
    reference = _as_batched(reference.detach(), batch)
    if own_content:
        index = getattr(tap, "token_index", None)
        if index is None:
            raise ValueError(f"{name}: own query content needs a teacher whose queries are selected encoder tokens "
                             "(RT-DETR: taps['queries'].token_index); this teacher's queries tap has none")
        return QueryGroup(name=name, content=None, reference=reference, token_index=index.detach())
    if content is None:
        if embed_dim is None:
            raise ValueError("the queries tap has no content vectors; pass embed_dim for zero content")
        content = reference.new_zeros(reference.shape[0], reference.shape[1], int(embed_dim))
    else:
        content = _as_batched(content.detach(), batch)
    if position is not None:
        position = _as_batched(position.detach(), batch)
    return QueryGroup(name=name, content=content, reference=reference, position=position)
