"""Distiller: a frozen teacher, a student and distillation methods, as one trainable model.

One training iteration (METHODS.md 1.3, clean behaviour of section 8)::

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
teacher follows the wrapper's mode; spec section 8 #1). Its own forward always runs under
``torch.no_grad()``. One gradient path through the teacher exists: a method with
``grad_through_teacher`` (CrossKD) runs the teacher's post-encoder path on the student's memory
with autograd on, so the gradient reaches the student through the frozen teacher. Teacher
parameters never receive a gradient: they stay ``requires_grad=False`` (``requires_grad_`` on the
distiller leaves the teacher alone, and every training forward checks it), so neither the optimiser
(trainable parameters only) nor DDP ever sees them.

Loss-key scheme (every method, see :mod:`tprd.distill.methods.base`): the student's own GT losses
keep their names (``loss_class``, ``loss_bbox_0`` ...); distillation terms are
``distill_<method>_<term>`` for the final stage and ``distill_<method>_<term>_<l>`` for stages
``l = 0 .. L-2``, each multiplied by the same configured weight. Non-loss diagnostics (TPRD
refinement shares per stage) are in :attr:`Distiller.last_stats`, named
``tprd_<method>_<group>_<stat>[_<l>]``, as detached tensors.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tprd.modeling.outputs import DetectorOutputs, ImageBatch, QueryGroup

from .methods.base import FEATURE_NEEDS, DistillContext, DistillMethod, expand_stage_terms
from tprd.errors import SetupError

from .setup_checks import check_method_values, check_teacher_state_dict, teacher_mode_note

__all__ = ["Distiller"]

logger = logging.getLogger("tprd.distill")


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _buffer_or_attr(model: nn.Module, name: str) -> Optional[Tensor]:
    value = getattr(model, name, None)
    if value is None:
        return None
    return torch.as_tensor(value).detach().float().flatten().cpu()


def _is_backbone_key(key: str) -> bool:
    return key.startswith("backbone.")


class Distiller(nn.Module):
    """Teacher-student distillation wrapper.

    Args:
        student: the detector being trained (``preprocess``, ``prepare_targets``,
            ``forward_outputs``, ``criterion``; ``student(batched_inputs)`` in eval).
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
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        methods: Union[Sequence[DistillMethod], Mapping[str, DistillMethod]] = (),
        teacher_train_mode: bool = False,
        profile: bool = False,
        check_pixel_stats: bool = True,
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
        self.last_stats: Dict[str, Tensor] = {}
        self.iteration: Optional[int] = None

        self.teacher.requires_grad_(False)
        check_method_values(methods)  # set-up checks: tprd/distill/setup_checks.py
        if self.teacher_train_mode:
            logger.warning(teacher_mode_note(teacher))
        if check_pixel_stats:
            self._check_pixel_stats()
        self._check_classes()
        for m in self.methods:
            if m.requires_equal_queries:
                nq_s, nq_t = getattr(student, "num_queries", None), getattr(teacher, "num_queries", None)
                if nq_s is not None and nq_t is not None and nq_s != nq_t:
                    raise SetupError(
                        f"method {m.name!r} pairs student and teacher queries by index and needs equal query "
                        f"counts, but the student has {nq_s} and the teacher {nq_t}: set the student's "
                        f"num_queries to {nq_t}"
                    )
            try:
                m.check_models(student, teacher)
            except ValueError as e:  # a teacher/student pair this method cannot use: the user's set-up
                raise SetupError(f"method {m.name!r}: {e}") from e
        self._student_takes_targets = _accepts(student.forward_outputs, "targets")
        self.train(self.training)

    # ------------------------------------------------------------------ construction checks
    def _check_pixel_stats(self) -> None:
        for name in ("pixel_mean", "pixel_std"):
            s, t = _buffer_or_attr(self.student, name), _buffer_or_attr(self.teacher, name)
            if s is None or t is None:
                continue
            if s.shape != t.shape or not torch.allclose(s, t):
                raise SetupError(
                    f"student and teacher {name} differ ({s.tolist()} vs {t.tolist()}): both see the same "
                    f"normalised input, so set the same {name} in both model configs"
                )

    def _check_classes(self) -> None:
        cs, ct = getattr(self.student, "num_classes", None), getattr(self.teacher, "num_classes", None)
        if cs is not None and ct is not None and int(cs) != int(ct):
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
        return self.student.device if hasattr(self.student, "device") else next(self.student.parameters()).device

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
        images = self.student.preprocess(batched_inputs)
        targets = self.student.prepare_targets(batched_inputs)
        ctx = DistillContext(images, targets, self.student, self.teacher, timings=timings, iteration=self.iteration)

        teacher_groups = self._collect_groups("teacher_query_groups", ctx)
        with ctx.section("teacher_forward"):
            ctx.teacher_out = self._run_teacher(images, teacher_groups)

        student_groups = self._collect_groups("student_query_groups", ctx)
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
        self.last_stats = stats
        if timings is not None:
            self.timings = timings
        return losses

    def _collect_groups(self, hook: str, ctx: DistillContext) -> List[QueryGroup]:
        groups: List[QueryGroup] = []
        for m in self.methods:
            groups.extend(getattr(m, hook)(ctx))
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
                taps = self._teacher_features(images)
                if taps is not None:
                    return DetectorOutputs(main=None, taps=taps)
            extra = {"return_attention": True} if "attention" in needs else {}
            return self.teacher.forward_outputs(images, query_groups=list(groups), **extra)

    def _teacher_features(self, images: ImageBatch) -> Optional[Dict[str, Any]]:
        """Backbone + neck of the teacher only (spec 8 #14), through the detector's
        ``forward_features(images) -> {"backbone", "neck", "neck_masks"}`` or
        ``extract_features(images) -> (backbone, neck, neck_masks)``; ``None`` if it has neither."""
        if hasattr(self.teacher, "forward_features"):
            feats = self.teacher.forward_features(images)
            return dict(feats.taps if isinstance(feats, DetectorOutputs) else feats)
        if hasattr(self.teacher, "extract_features"):
            backbone, neck, masks = self.teacher.extract_features(images)
            return {"backbone": backbone, "neck": list(neck), "neck_masks": list(masks)}
        return None

    def _run_student(self, images: ImageBatch, groups: Sequence[QueryGroup], targets) -> DetectorOutputs:
        extra = {"return_attention": True} if "attention" in self.student_needs else {}
        if self._student_takes_targets:
            extra["targets"] = targets
        return self.student.forward_outputs(images, query_groups=list(groups), **extra)

    def student_gt_losses(self, outputs: DetectorOutputs, targets) -> Dict[str, Tensor]:
        """The student's weighted GT losses, exactly as its own training forward weights them
        (``compute_losses`` if the detector has one, else ``criterion`` + ``weight_losses``)."""
        student = self.student
        if hasattr(student, "compute_losses"):
            return dict(student.compute_losses(outputs, targets))
        criterion = getattr(student, "criterion", None)
        if criterion is None:
            raise RuntimeError("the student was built without a criterion; it cannot compute its GT losses")
        losses = criterion(outputs, targets)
        if hasattr(criterion, "weight_losses"):
            return dict(criterion.weight_losses(losses))
        weights = getattr(criterion, "weight_dict", {})
        return {k: v * weights[k] if k in weights else v for k, v in losses.items()}

    # ------------------------------------------------------------------ checkpoints
    def split_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        """Split a flat state dict by prefix: ``student``, ``teacher``, ``methods`` and ``other``
        (un-prefixed duplicates written by the reference's merge script, anything else)."""
        parts: Dict[str, Dict[str, Tensor]] = {"student": {}, "teacher": {}, "methods": {}, "other": {}}
        for key, value in state_dict.items():
            head, _, rest = key.partition(".")
            if head in ("student", "teacher", "methods") and rest:
                parts[head][rest] = value
            else:
                parts["other"][key] = value
        return parts

    def convert_detrex_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Merged init file (``merge_weight.py``: ``student.backbone.<detectron2 names>``,
        ``teacher.<detrex names>``, ``student.transformer.level_embeds``) or a distiller checkpoint
        -> this model's keys. Each part goes through its own detector's converter (parts already in
        this model's naming, e.g. a saved distiller, are kept as they are); un-prefixed keys are
        dropped (reported by :meth:`load_init_checkpoint`).

        Raises ``ValueError`` when the teacher part would leave any teacher key missing (a teacher
        that loads partially is an error, never a warning); the message lists the keys.
        """
        parts = self.split_state_dict(state_dict)
        if not parts["student"] and not parts["teacher"]:
            sample = ", ".join(list(state_dict)[:5])
            from tprd.checkpoint import CheckpointMismatchError, describe_state_dict

            raise CheckpointMismatchError(
                "this checkpoint has no 'student.'/'teacher.' keys, so it is not a distillation init file "
                f"(first keys: {sample}; it looks like {describe_state_dict(state_dict)}). Build one with merge_weight.py --input1 <student backbone> "
                "--input2 <teacher checkpoint> and pass it as train.init_checkpoint"
            )
        out: Dict[str, Tensor] = {}
        for part, model in (("student", self.student), ("teacher", self.teacher)):
            sub = parts[part]
            native = set(sub) <= set(model.state_dict().keys())  # e.g. a distiller checkpoint
            if part == "teacher":
                check_teacher_state_dict(model, sub)  # another detector / class count, named
            if sub and not native and hasattr(model, "convert_detrex_state_dict"):
                sub = model.convert_detrex_state_dict(sub)
            out.update({f"{part}.{k}": v for k, v in sub.items()})
        out.update({f"methods.{k}": v for k, v in parts["methods"].items()})
        missing_teacher = self._missing(out, "teacher")
        if missing_teacher:
            from tprd.checkpoint import CheckpointMismatchError

            raise CheckpointMismatchError(self._teacher_missing_message(missing_teacher))
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
            self._check_student_backbone(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_student_backbone(self, converted: Mapping[str, Tensor]) -> List[str]:
        """The student's missing keys; ``ValueError`` if any of them is a backbone key."""
        student_missing = self._missing(converted, "student")
        # BatchNorm's num_batches_tracked is a counter, not a weight (merge_weight.py leaves it out)
        backbone_missing = [k for k in student_missing if _is_backbone_key(k) and not k.endswith("num_batches_tracked")]
        if backbone_missing:
            from tprd.checkpoint import CheckpointMismatchError

            raise CheckpointMismatchError(
                f"the init checkpoint leaves {len(backbone_missing)} student backbone keys missing, e.g. "
                f"{backbone_missing[:5]}; build it with merge_weight.py from an ImageNet ResNet of the student's depth"
            )
        return student_missing

    def _missing(self, converted: Mapping[str, Tensor], part: str) -> List[str]:
        own = getattr(self, part).state_dict().keys()
        return [k for k in own if f"{part}.{k}" not in converted]

    @staticmethod
    def _teacher_missing_message(missing: Sequence[str]) -> str:
        shown = "\n  ".join(missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        return (
            f"the init checkpoint leaves {len(missing)} teacher keys missing (a teacher must load completely):"
            f"\n  {shown}{more}\nCheck that --input2 of merge_weight.py is a checkpoint of the teacher named in "
            "the config (same detector, depth and num_classes)."
        )

    def load_init_checkpoint(self, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]]) -> Dict[str, List[str]]:
        """Load a merged init file (path or state dict) with the distillation policy:

        * teacher: every key must load (``CheckpointMismatchError``, a ``ValueError``, listing the
          missing ones otherwise);
        * student backbone: every key must load (same error; the merged file always has it);
        * student, other keys: may be missing (freshly initialised parts), reported;
        * shape mismatches anywhere: the same error naming key and shapes.

        Returns the report ``{"student_missing", "methods_missing", "unexpected", "dropped"}``.
        """
        if isinstance(checkpoint, Mapping):
            state_dict = dict(checkpoint)
        else:
            from tprd.checkpoint.merge import load_state_dict_file

            state_dict = load_state_dict_file(checkpoint)
        dropped = sorted(self.split_state_dict(state_dict)["other"])
        converted = self.convert_detrex_state_dict(state_dict)
        own = self.state_dict()
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in converted.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if mismatched:
            from tprd.checkpoint import CheckpointMismatchError

            raise CheckpointMismatchError("init checkpoint shapes do not match the model:\n  " + "\n  ".join(mismatched))
        student_missing = self._check_student_backbone(converted)
        incompatible = self.load_state_dict(converted, strict=False)
        report = {
            "student_missing": student_missing,
            "methods_missing": [k for k in incompatible.missing_keys if k.startswith("methods.")],
            "unexpected": list(incompatible.unexpected_keys),
            "dropped": dropped,
        }
        logger.info(
            "Loaded distillation init checkpoint: teacher complete; student missing %d non-backbone keys "
            "(freshly initialised); %d unexpected keys; %d un-prefixed keys dropped.",
            len(student_missing),
            len(report["unexpected"]),
            len(dropped),
        )
        return report
