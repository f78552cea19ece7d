"""Distiller: a frozen teacher, a student and distillation methods, as one trainable model.

One training iteration (docs/methods.md#one-iteration)::

    images  = student.preprocess(batch)            # one normalised, padded tensor + mask for both
    targets = student.prepare_targets(batch)
    groups  = methods' teacher query groups        # e.g. KD-DETR general points
    with no_grad: teacher_out = teacher.forward_outputs(images, groups)   # only as far as needed
    groups  = methods' student query groups        # e.g. the teacher's own queries
    student_out = student.forward_outputs(images, groups[, targets])     # DINO: with denoising
    losses  = student GT losses (weighted as the student's own forward does)
            + each method's terms x weights         # distill_<method>_<term>[_<stage>]

In eval mode the distiller returns exactly ``student(batched_inputs)``; the teacher is not run.

The teacher is frozen (``requires_grad=False``) and stays in eval mode whatever ``train()`` is
called with (dropout off), unless ``teacher_train_mode=True`` (the reference's behaviour: the
teacher follows the wrapper's mode; docs/methods.md#diff-1). Its own forward always runs under
``torch.no_grad()``. One gradient path through the teacher exists: a method with
``grad_through_teacher`` (CrossKD) runs the teacher's post-encoder path on the student's memory
with autograd on, so the gradient reaches the student through the frozen teacher. Teacher
parameters never receive a gradient: they stay ``requires_grad=False`` (``requires_grad_`` on the
distiller leaves the teacher alone, and every training forward checks it), so neither the optimiser
(trainable parameters only) nor DDP ever sees them.

Loss-key scheme (every method, see :mod:`tprd.distill.methods.base`): the student's own GT losses
keep their names (``loss_class``, ``loss_bbox_0`` ...); distillation terms are
``distill_<method>_<term>`` for the final stage and ``distill_<method>_<term>_<l>`` for stages
``l = 0 .. L-2``, each multiplied by the same configured weight.

The trainer and the distiller talk through the event storage (:mod:`tprd.utils.events`), never
through attributes: the distiller reads the training iteration from it (``None`` outside a
trainer) and puts the non-loss diagnostics of every iteration -- TPRD refinement shares per stage,
named ``tprd_<method>_<group>_<stat>[_<l>]`` -- into it as detached tensors
(:meth:`~tprd.utils.events.EventStorage.put_stats`); outside a storage they are dropped.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tprd.checkpoint import CheckpointMismatchError
from tprd.checkpoint.distill_init import check_student_backbone, convert_init_state_dict, load_distill_init_checkpoint
from tprd.errors import SetupError
from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import DetectorOutputs, ImageBatch, QueryGroup
from tprd.utils.events import current_event_storage

from .methods.base import FEATURE_NEEDS, DistillContext, DistillMethod, expand_stage_terms
from .methods.common import stage_pairing as _stage_pairing
from .setup_checks import check_method_values, teacher_mode_note

__all__ = ["Distiller"]

logger = logging.getLogger("tprd.distill")


class Distiller(nn.Module):
    """Teacher-student distillation wrapper.

    Args:
        student: the detector being trained, a :class:`~tprd.modeling.detector.DETRDetector`
            (the distiller uses only its declared interface; ``student(batched_inputs)`` in eval).
        teacher: a detector of the same family (any query count; R50 typically).
        methods: distillation methods (:class:`~tprd.distill.methods.base.DistillMethod`), a list
            or a ``{name: method}`` mapping (the mapping's order is kept; its keys are ignored, the
            methods' own ``name`` names the loss keys).
        teacher_train_mode: ``False`` (default): the teacher stays in eval mode. ``True``: it follows
            ``train()``/``eval()`` like the reference's (dropout active in a Deformable DETR teacher).
        profile: record wall times of the parts of an iteration in :attr:`timings`
            (``teacher_forward``, ``student_forward``, ``student_gt_loss``, ``matching``, ``tprd``,
            ``method_losses`` -- ``method_losses`` includes the matching and TPRD times).
        check_pixel_stats: require identical pixel mean/std (the shared input is normalised once).
        stage_pairing: which teacher stage each student stage learns from when their decoder depths
            differ (:func:`~tprd.distill.methods.common.stage_pairing`): ``"uniform"`` (default:
            spread evenly, final <-> final; 6 -> 3 gives teacher stages 1, 3, 5), ``"last"`` or an
            explicit list of teacher stages. Equal depths always pair stage ``l`` with stage ``l``
            (docs/methods.md#stage-pairing).
    """

    def __init__(
        self,
        student: DETRDetector,
        teacher: DETRDetector,
        methods: Union[Sequence[DistillMethod], Mapping[str, DistillMethod]] = (),
        teacher_train_mode: bool = False,
        profile: bool = False,
        check_pixel_stats: bool = True,
        stage_pairing: Union[str, Sequence[int]] = "uniform",
    ):
        super().__init__()
        if isinstance(methods, Mapping):
            methods = list(methods.values())
        methods = list(methods)
        for m in methods:
            if not isinstance(m, DistillMethod):
                raise TypeError(f"methods must be DistillMethod instances, got {type(m).__name__}")
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise SetupError(f"distillation method names must be unique (they prefix loss keys), got {names}")
        self.student = student
        self.teacher = teacher
        self.methods = nn.ModuleList(methods)
        self.teacher_train_mode = bool(teacher_train_mode)
        self.profile = bool(profile)
        self.timings: Dict[str, float] = {}

        self.teacher.requires_grad_(False)
        # a teacher that stops early in eval (RT-DETR's eval_idx) must still give every stage
        self.teacher.keep_all_stages_in_eval()
        check_method_values(methods)  # set-up checks: tprd/distill/setup_checks.py
        if self.teacher_train_mode:
            logger.warning(teacher_mode_note(teacher))
        if check_pixel_stats:
            self._check_pixel_stats()
        self._check_classes()
        for m in self.methods:
            if m.requires_equal_queries:
                nq_s, nq_t = student.num_queries, teacher.num_queries
                if nq_s != nq_t:
                    raise SetupError(
                        f"method {m.name!r} pairs student and teacher queries by index and needs equal query "
                        f"counts, but the student has {nq_s} and the teacher {nq_t}: set the student's "
                        f"num_queries to {nq_t}"
                    )
            try:
                m.check_models(student, teacher)
            except ValueError as e:  # a teacher/student pair this method cannot use: the user's set-up
                raise SetupError(f"method {m.name!r}: {e}") from e
        #: the teacher stage of each student stage (docs/methods.md#stage-pairing), ``None`` when stage l
        #: pairs with stage l. A teacher shallower than the student has no pairing; the prediction-level
        #: methods refuse it above (check_same_stages), the feature-level ones never pair stages.
        self.teacher_stages: Optional[List[int]] = None
        try:
            pairing = _stage_pairing(student.num_stages, teacher.num_stages, stage_pairing)
        except ValueError as e:
            if not isinstance(stage_pairing, str) or student.num_stages <= teacher.num_stages:
                raise SetupError(f"stage_pairing: {e}") from e  # a bad explicit list
            pairing = None
        if pairing is not None and pairing != list(range(teacher.num_stages)):
            self.teacher_stages = pairing
        self.train(self.training)

    # ------------------------------------------------------------------ construction checks
    def _check_pixel_stats(self) -> None:
        pairs = {
            "pixel_mean": (self.student.pixel_mean, self.teacher.pixel_mean),
            "pixel_std": (self.student.pixel_std, self.teacher.pixel_std),
        }
        for name, (s, t) in pairs.items():
            s, t = s.detach().float().flatten().cpu(), t.detach().float().flatten().cpu()
            if s.shape != t.shape or not torch.allclose(s, t):
                raise SetupError(
                    f"student and teacher {name} differ ({s.tolist()} vs {t.tolist()}): both see the same "
                    f"normalised input, so set the same {name} in both model configs"
                )

    def _check_classes(self) -> None:
        cs, ct = self.student.num_classes, self.teacher.num_classes
        if int(cs) != int(ct):
            raise SetupError(
                f"student has {cs} classes but the teacher {ct}: distillation needs the same label space "
                f"(e.g. a VOC student needs a 20-class teacher)"
            )

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if not self.teacher_train_mode:
            self.teacher.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "Distiller":
        """Student and method adapters only: the teacher stays frozen whatever is asked."""
        self.student.requires_grad_(requires_grad)
        self.methods.requires_grad_(requires_grad)
        return self

    def _check_teacher_frozen(self) -> None:
        thawed = [n for n, p in self.teacher.named_parameters() if p.requires_grad]
        if thawed:
            raise RuntimeError(
                f"{len(thawed)} teacher parameters require gradients (e.g. {thawed[:3]}); the teacher must stay "
                "frozen. Something called requires_grad_(True) on the teacher: call distiller.teacher.requires_grad_(False)"
            )

    @property
    def device(self) -> torch.device:
        return self.student.device

    @property
    def needs(self) -> frozenset:
        """Union of the methods' teacher needs."""
        out = set()
        for m in self.methods:
            out.update(m.needs)
        return frozenset(out)

    @property
    def student_needs(self) -> frozenset:
        """Union of the methods' student needs (``attention``: decoder attention taps)."""
        out = set()
        for m in self.methods:
            out.update(m.student_needs)
        return frozenset(out)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: Sequence[Mapping[str, Any]]):
        if not self.training:
            return self.student(batched_inputs)
        return self.forward_train(batched_inputs)

    def forward_train(self, batched_inputs: Sequence[Mapping[str, Any]]) -> Dict[str, Tensor]:
        """Weighted loss dict of one training iteration (also usable in eval mode, e.g. to measure
        validation losses)."""
        self._check_teacher_frozen()
        timings = {} if self.profile else None
        storage = current_event_storage()
        images = self.student.preprocess(batched_inputs)
        targets = self.student.prepare_targets(batched_inputs)
        ctx = DistillContext(images, targets, self.student, self.teacher, timings=timings,
                             iteration=None if storage is None else storage.iter, teacher_stages=self.teacher_stages)

        teacher_groups = self._collect_groups([m.teacher_query_groups for m in self.methods], ctx)
        with ctx.section("teacher_forward"):
            ctx.teacher_out = self._run_teacher(images, teacher_groups)

        student_groups = self._collect_groups([m.student_query_groups for m in self.methods], ctx)
        with ctx.section("student_forward"):
            ctx.student_out = self._run_student(images, student_groups, targets)

        with ctx.section("student_gt_loss"):
            losses = self.student_gt_losses(ctx.student_out, targets)

        stats: Dict[str, Tensor] = {}
        with ctx.section("method_losses"):
            for m in self.methods:
                m.last_stats = {}
                raw = m.losses(ctx)
                unknown = set(raw) - set(m.terms)
                if unknown:
                    raise KeyError(f"method {m.name!r} returned terms {sorted(unknown)} not in its terms {list(m.terms)}")
                for key, value in expand_stage_terms(f"distill_{m.name}", raw, m.weights).items():
                    if key in losses:
                        raise KeyError(f"loss key {key!r} produced twice")
                    losses[key] = value
                stats.update({k: v.detach() for k, v in m.last_stats.items()})
        if storage is not None:
            storage.put_stats(stats)
        if timings is not None:
            self.timings = timings
        return losses

    @staticmethod
    def _collect_groups(hooks: Sequence[Callable[[DistillContext], List[QueryGroup]]], ctx: DistillContext) -> List[QueryGroup]:
        groups: List[QueryGroup] = []
        for hook in hooks:
            groups.extend(hook(ctx))
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"query group names must be unique across methods, got {names}")
        return groups

    def _run_teacher(self, images: ImageBatch, groups: Sequence[QueryGroup]) -> Optional[DetectorOutputs]:
        needs = self.needs
        if not needs and not groups:
            return None
        with torch.no_grad():
            if not groups and needs <= FEATURE_NEEDS:
                # backbone + neck only: a feature-level method never pays for the teacher's transformer
                out = DetectorOutputs(main=None, taps=dict(self.teacher.forward_features(images)))
            else:
                out = self.teacher.forward_outputs(images, query_groups=list(groups),
                                                   return_attention="attention" in needs)
        if "backbone" not in needs:
            # the teacher's backbone maps (R50: ~30 MB at 512x512, batch 2) would otherwise stay alive
            # through the student's forward and backward, at the step's memory peak; no method that
            # does not declare the need reads them
            out.taps.pop("backbone", None)
        return out

    def _run_student(self, images: ImageBatch, groups: Sequence[QueryGroup], targets) -> DetectorOutputs:
        return self.student.forward_outputs(
            images, query_groups=list(groups), targets=targets, return_attention="attention" in self.student_needs
        )

    def student_gt_losses(self, outputs: DetectorOutputs, targets) -> Dict[str, Tensor]:
        """The student's weighted GT losses, exactly as its own training forward weights them."""
        return dict(self.student.compute_losses(outputs, targets))

    # ------------------------------------------------------------------ checkpoints
    def convert_detrex_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Merged init file (``merge_weight.py``) or a distiller checkpoint -> this model's keys, by
        the rules of :func:`tprd.checkpoint.distill_init.convert_init_state_dict` (each part through
        its detector's adapter, a teacher that would load partially is an error)."""
        return convert_init_state_dict(state_dict, self.student, self.teacher,
                                       self.convert_reference_method_state_dict)

    def convert_reference_method_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The reference distiller's ``distill_criterion.*`` entries (prefix removed: FGD's context
        blocks, FitNet's and MGD's adapters, MGD's generation blocks) -> ``methods.<i>.*``, each
        key renamed by the first method whose
        :attr:`~tprd.distill.methods.base.DistillMethod.reference_key_rules` knows it.

        Raises ``CheckpointMismatchError`` naming the keys no method of this distiller knows (e.g. an
        FGD checkpoint loaded into an MGD config)."""
        out: Dict[str, Tensor] = {}
        left = dict(state_dict)
        for i, m in enumerate(self.methods):
            if not left:
                break
            converted, unknown = m.convert_reference_state_dict(left)
            out.update({f"methods.{i}.{k}": v for k, v in converted.items()})
            left = {k: left[k] for k in unknown}
        if left:
            names = [type(m).__name__ for m in self.methods] or ["none"]
            shown = ", ".join(f"distill_criterion.{k}" for k in list(left)[:8])
            raise CheckpointMismatchError(
                f"{len(left)} keys of the reference distiller's own modules are not known to this config's methods "
                f"({', '.join(names)}): {shown}{' ...' if len(left) > 8 else ''}. Use the config of the method the "
                "checkpoint was trained with (FGD, FitNet or MGD), or drop these keys to start the method's modules "
                "fresh"
            )
        return out

    def _is_native(self, state_dict: Mapping[str, Tensor]) -> bool:
        return set(state_dict) <= set(self.state_dict().keys())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also accepts a merged init file or detrex-named parts:
        a state dict that is not entirely in this model's naming goes through
        :meth:`convert_detrex_state_dict` first (so a teacher with missing keys is an error even
        through a generic, non-strict checkpoint loader, and so is a student without backbone)."""
        if not self._is_native(state_dict) and any(
            k.startswith(("student.", "teacher.")) for k in state_dict
        ):
            state_dict = self.convert_detrex_state_dict(state_dict)
            check_student_backbone(self.student, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_init_checkpoint(self, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]]) -> Dict[str, List[str]]:
        """Load a merged init file (path or state dict) with the distillation policy of
        :mod:`tprd.checkpoint.distill_init` (teacher and student backbone complete, the rest of the
        student may be fresh). Returns the report ``{"student_missing", "methods_missing",
        "unexpected", "dropped"}``."""
        return load_distill_init_checkpoint(self, checkpoint, self.student, self.teacher,
                                            self.convert_reference_method_state_dict)
