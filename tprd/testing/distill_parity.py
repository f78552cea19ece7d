"""Run a distillation parity fixture of the reference implementation through our own distiller.

A distillation fixture (layout: ``tests/fixtures/reference/distill_parity/README.md``) records one
training step of one reference distiller on reduced models with deterministically filled weights:
the returned (weighted) loss dict, gradient checksums and every random draw of the forward.
:func:`run_distill_fixture` reproduces that step with nothing but this project's public pieces:

1. our own config of the method and detector (``projects/<family>/cfg_distill/<Method>/``, the
   COCO file), with the fixture's reduction (``config.json`` -> ``reduction_from_reference_config``)
   translated into ordinary config overrides, plus the reference-compatibility flags of
   :data:`REFERENCE_FLAGS`;
2. the ``crc32-randn-v1`` fill of ``keys.json`` (reference key names), loaded through
   :meth:`~tprd.distill.Distiller.load_init_checkpoint` -- every student, teacher and method key must
   load;
3. one training forward with the recorded random draws injected (:class:`DrawReplay`), the backward
   of the total, and per loss term the reference value, ours and the difference
   (:data:`LOSS_KEY_MAP` names the terms), plus the gradient checks.
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .fill import fill_state_dict

__all__ = [
    "LOSS_KEY_MAP",
    "REFERENCE_FLAGS",
    "TOLERANCES",
    "DrawReplay",
    "DrawReplayError",
    "DistillParityResult",
    "default_distill_fixture_root",
    "find_distill_fixtures",
    "our_config_file",
    "reduction_overrides",
    "build_distiller",
    "map_loss_key",
    "run_distill_fixture",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Tolerances (from the fixtures' own 1- vs 2-thread regeneration, with margin): each loss
#: ``|diff| <= loss_atol + loss_rtol * |ref|``; gradient global norm relative; per parameter
#: ``sum_abs`` and ``max_abs`` relative with an absolute floor for near-zero gradients, and
#: ``|sum diff| <= sum_rel * sum_abs + sum_atol``.
TOLERANCES = dict(
    loss_atol=1e-4,
    loss_rtol=1e-4,
    grad_norm_rtol=1e-3,
    sum_abs_rtol=2e-3,
    sum_abs_atol=1e-4,
    max_abs_rtol=5e-3,
    max_abs_atol=1e-5,
    sum_rel=1e-3,
    sum_atol=1e-3,
)

#: Reference loss key (stage suffix removed) -> our key, per reference method (folder name without
#: ``_TPRD``). Stage suffixes ``_0 .. _4`` carry over unchanged; the student's own GT losses
#: (``loss_class``, ``loss_bbox_dn_0``, ``loss_giou_enc`` ...) have the same names in both.
LOSS_KEY_MAP: Dict[str, Dict[str, str]] = {
    "DETRDistill": {
        "distill_loss_class": "distill_detrdistill_class",
        "distill_loss_bbox": "distill_detrdistill_l1",
        "distill_loss_giou": "distill_detrdistill_giou",
        "target_aware_loss": "distill_detrdistill_target_aware",
        "teacher_loss_class": "distill_detrdistill_prior_class",
        "teacher_loss_bbox": "distill_detrdistill_prior_l1",
        "teacher_loss_giou": "distill_detrdistill_prior_giou",
    },
    "KD_DETR": {
        "auxilary_loss_class": "distill_kd_detr_general_class",
        "auxilary_loss_bbox": "distill_kd_detr_general_l1",
        "auxilary_loss_giou": "distill_kd_detr_general_giou",
        "teacher_loss_class": "distill_kd_detr_specific_class",
        "teacher_loss_bbox": "distill_kd_detr_specific_l1",
        "teacher_loss_giou": "distill_kd_detr_specific_giou",
    },
    "D3DETR": {
        **{f"distill_loss_{r}": f"distill_d3detr_{o}" for r, o in
           (("class", "class"), ("bbox", "l1"), ("giou", "giou"), ("self_attn", "self_attn"), ("cross_attn", "cross_attn"))},
        **{f"teacher_loss_{r}": f"distill_d3detr_fixed_{o}" for r, o in
           (("class", "class"), ("bbox", "l1"), ("giou", "giou"), ("self_attn", "self_attn"), ("cross_attn", "cross_attn"))},
    },
    "QSKD": {
        "distill_loss_class": "distill_qskd_class",
        "distill_loss_bbox": "distill_qskd_l1",
        "distill_loss_giou": "distill_qskd_giou",
        "target_aware_loss": "distill_qskd_feature",
    },
    "CrossKD": {
        "distill_loss_class": "distill_crosskd_class",
        "distill_loss_bbox": "distill_crosskd_l1",
        "distill_loss_giou": "distill_crosskd_giou",
    },
    "FGD": {"loss_distill_dis": "distill_fgd_fgd"},
    "FitNet": {"loss_distill_dis": "distill_fitnet_fitnet"},
    "MGD": {"loss_distill_masked_neck": "distill_mgd_mgd"},
}

#: Where we deliberately differ from the reference: the config flag that restores the reference's
#: behaviour, where it lives, and the loss terms it changes. The tool sets every flag the config
#: accepts (defaults stay the clean behaviour). ``scope``: ``distiller`` or ``method`` (set on every
#: method whose constructor takes it).
REFERENCE_FLAGS: List[Dict[str, Any]] = [
    dict(flag="teacher_train_mode", scope="distiller", value=True,
         what="the teacher follows train()/eval() (dropout 0.1 active in a Deformable DETR teacher); "
              "default: the teacher always stays in eval mode",
         terms="every distillation term whose teacher ran with active dropout (none at dropout 0)"),
    dict(flag="skip_empty_images", scope="method", value=True,
         what="TPRD leaves the queries of an image without GT unrefined; default: they are all negatives "
              "and refined by the negative rule",
         terms="the refined (TPRD) terms of batches with an empty image"),
    dict(flag="reference_stage_order", scope="method", value=True,
         what="QSKD pairs the selection list [final, stage 1..5] with attention maps [layer 1..6]; default: "
              "stage l with layer l",
         terms="QSKD feature (target-aware) terms of every stage"),
    dict(flag="raw_general_refs", scope="method", value=True,
         what="DINO KD-DETR: the general points' N(0,1) reference boxes are used raw; default: sigmoid "
              "(no effect on Deformable DETR and DAB-DETR)",
         terms="KD-DETR general class / L1 / GIoU terms of every stage (DINO)"),
    dict(flag="reference_processes", scope="method", value=1,
         what="FitNet / MGD divide their MSE again by the images of the process the fixture ran on (one "
              "process); default: by total batch / 2, the reference's images per GPU at its documented "
              "2 GPUs, the same on any number of processes",
         terms="FitNet and MGD terms (x2 at the default on one process)"),
]

# every reference random function, by kind; a recorded draw and ours must be of one kind
_DRAW_KINDS = {
    "normal": ("torch.randn", "torch.randn_like", "torch.normal", "torch.Tensor.normal_"),
    "uniform": ("torch.rand", "torch.rand_like", "torch.Tensor.uniform_"),
    "integer": ("torch.randint", "torch.randint_like", "torch.Tensor.random_"),
    "permutation": ("torch.randperm",),
    "bernoulli": ("torch.bernoulli", "torch.Tensor.bernoulli_"),
    "multinomial": ("torch.multinomial",),
    "poisson": ("torch.poisson",),
    "exponential": ("torch.Tensor.exponential_",),
    "geometric": ("torch.Tensor.geometric_",),
    "cauchy": ("torch.Tensor.cauchy_",),
    "log_normal": ("torch.Tensor.log_normal_",),
}
_KIND_OF = {name: kind for kind, names in _DRAW_KINDS.items() for name in names}


def default_distill_fixture_root() -> Path:
    """``$TPRD_REFERENCE_DIR/distill_parity``, by default the copy in this repository
    (``tests/fixtures/reference/distill_parity``)."""
    base = os.environ.get("TPRD_REFERENCE_DIR")
    root = Path(base) if base else REPO_ROOT / "tests" / "fixtures" / "reference"
    return root / "distill_parity"


def find_distill_fixtures(root) -> List[Path]:
    """Every folder below ``root`` (or ``root`` itself) holding a distillation fixture."""
    root = Path(root)
    if (root / "config.json").is_file() and (root / "losses.json").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("config.json") if (p.parent / "losses.json").is_file())


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def method_folder(config: Mapping[str, Any]) -> str:
    """The reference method folder's name (``KD_DETR_TPRD``), from ``reference_method_folder``."""
    folder = config.get("reference_method_folder")
    if not folder:
        raise KeyError("config.json has no 'reference_method_folder' (e.g. 'projects/deformable_detr/KD_DETR')")
    return Path(folder).name


def base_method(config: Mapping[str, Any]) -> str:
    name = method_folder(config)
    return name[: -len("_TPRD")] if name.endswith("_TPRD") else name


def our_config_file(config: Mapping[str, Any], repo: Path = REPO_ROOT) -> Path:
    """Our COCO config of the fixture's method and detector:
    ``projects/<family>/cfg_distill/<Method>/<detector>_r50_distill_r18_{50ep,4scale_12ep}.py``."""
    family = config.get("family")
    folder = repo / "projects" / str(family) / "cfg_distill" / method_folder(config)
    if not folder.is_dir():
        raise FileNotFoundError(f"no config folder {folder} for the fixture's method "
                                f"{config.get('reference_method_folder')!r} (family {family!r})")
    files = sorted(p for p in folder.glob("*.py") if re.search(r"_(50ep|4scale_12ep|12ep)\.py$", p.name))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one COCO config (*_50ep.py / *_4scale_12ep.py) in {folder}, found "
                                f"{[p.name for p in files]}")
    return files[0]


_REDUCTION_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*(.+?)\s*->\s*(.+?)\s*$")


def _parse_reduction(entries: Sequence[str]) -> List[Tuple[str, Any]]:
    """``"student.num_queries: 300 -> 30"`` -> ``("student.num_queries", 30)``; the dropout entry
    (``"every dropout probability set to 0.0: a: 0.1 -> 0.0; b: ..."``) is split into its items."""
    out = []
    for entry in entries:
        if entry.startswith("every dropout probability"):
            items = entry.split(":", 1)[1].strip()
            if items.startswith("none"):
                continue
            out += _parse_reduction([i for i in items.split(";") if i.strip()])
            continue
        m = _REDUCTION_RE.match(entry)
        if not m:
            raise ValueError(f"cannot read reduction entry {entry!r} (expected 'path: old -> new')")
        path, _, new = m.groups()
        try:
            value = ast.literal_eval(new)
        except (ValueError, SyntaxError):
            value = new.strip("'\"")
        out.append((path, value))
    return out


def _plain(cfg) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)


def _lookup(plain: Any, dotted: str) -> Tuple[bool, Any]:
    node = plain
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _target_params(node: Mapping[str, Any]) -> set:
    from tprd.config.instantiate import locate

    target = node.get("_target_") if isinstance(node, Mapping) else None
    if target is None:
        return set()
    obj = locate(target) if isinstance(target, str) else target
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return set()
    names = set(params)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        # prediction-level methods take their TPRD options as **tprd (TPRDOptions' fields)
        import dataclasses

        from tprd.distill.methods.base import TPRDOptions

        names |= {f.name for f in dataclasses.fields(TPRDOptions)}
    return names


def reduction_overrides(cfg, config: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """The fixture's reduction as overrides of our config: ``(overrides, notes)``.

    ``student.* / teacher.*`` -> ``model.student.* / model.teacher.*``; ``distill_criterion.<x>`` and
    bare ``<x>`` (e.g. ``general_points``) -> ``model.methods.<m>.<x>`` of every method that takes
    ``x``, or ``model.<x>`` on the distiller; ``device`` entries are dropped (we run where the
    tensors are); a method-level ``num_classes`` our methods do not take must equal the student's.
    Anything else that has no counterpart is an error naming the entry.
    """
    plain = _plain(cfg)
    methods = plain["model"].get("methods") or {}
    overrides, notes, deferred = [], [], []
    for path, value in _parse_reduction(config.get("reduction_from_reference_config", [])):
        head, _, rest = path.partition(".")
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "device":
            notes.append(f"{path}: not applied (runs on the CPU)")
            continue
        if head in ("student", "teacher") and rest:
            ours = f"model.{path}"
            if not _lookup(plain, ours)[0]:
                raise KeyError(f"reduction entry {path!r}: our config has no {ours}")
            overrides.append(f"{ours}={value!r}")
            continue
        key = rest if head == "distill_criterion" else path
        hits = [f"model.methods.{n}.{key}" for n, node in methods.items()
                if key in (node or {}) or key in _target_params(node)]
        if hits:
            overrides += [("" if _lookup(plain, h)[0] else "+") + f"{h}={value!r}" for h in hits]
        elif _lookup(plain, f"model.{key}")[0]:
            overrides.append(f"model.{key}={value!r}")
        elif key == "num_classes":
            deferred.append((path, value))
        else:
            raise KeyError(f"reduction entry {path!r} has no counterpart in our config (model.methods: {list(methods)})")
    for path, value in deferred:  # our methods take the class count from the student
        student = dict(o.split("=", 1) for o in overrides).get("model.student.num_classes")
        if student is None or ast.literal_eval(student) != value:
            raise ValueError(f"reduction entry {path!r} = {value} but the student's num_classes is {student}")
        notes.append(f"{path}: our methods use the student's num_classes ({value})")
    return overrides, notes


def reference_flag_overrides(cfg) -> List[str]:
    """The :data:`REFERENCE_FLAGS` overrides this config accepts (plus the pure-PyTorch deformable
    attention, the reference's CPU path)."""
    plain = _plain(cfg)
    model = plain["model"]
    out = []
    for spec in REFERENCE_FLAGS:
        if spec["scope"] == "distiller":
            if spec["flag"] in model or spec["flag"] in _target_params(model):
                out.append(("" if spec["flag"] in model else "+") + f"model.{spec['flag']}={spec['value']!r}")
            continue
        for name, node in (model.get("methods") or {}).items():
            if spec["flag"] in (node or {}):
                out.append(f"model.methods.{name}.{spec['flag']}={spec['value']!r}")
            elif spec["flag"] in _target_params(node):
                out.append(f"+model.methods.{name}.{spec['flag']}={spec['value']!r}")
    for part in ("student", "teacher"):
        if "msda_backend" in model[part]:
            out.append(f"model.{part}.msda_backend='pytorch'")
    return out


def build_distiller(config: Mapping[str, Any], reference_flags: bool = True,
                    extra_overrides: Sequence[str] = ()) -> Tuple[nn.Module, List[str], List[str]]:
    """Our distiller for a fixture's ``config.json``: ``(model, overrides, notes)``."""
    from tprd.config import LazyConfig, instantiate

    path = our_config_file(config)
    cfg = LazyConfig.load(str(path))
    overrides, notes = reduction_overrides(cfg, config)
    if reference_flags:
        overrides += reference_flag_overrides(cfg)
    overrides += list(extra_overrides)
    LazyConfig.apply_overrides(cfg, overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    active = [f"{n}: p={m.p}" for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p != 0]
    active += [f"{n}: dropout={m.dropout}" for n, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention) and m.dropout != 0]
    if active:
        raise ValueError(f"{path}: the fixture runs without dropout, but after the reduction these modules still "
                         f"have it: {active[:5]}")
    return model, overrides, notes


# ------------------------------------------------------------------------------------------------
# random draws
# ------------------------------------------------------------------------------------------------
class DrawReplayError(RuntimeError):
    """A random draw of ours has no recorded counterpart (or not of the same kind / shape), or a
    recorded draw was left unused."""


def _shape_from(args, kwargs) -> Tuple[int, ...]:
    size = kwargs.get("size")
    if size is None:
        ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        seqs = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        size = seqs[0] if seqs else ints
    return tuple(int(s) for s in size)


class DrawReplay:
    """Context manager: every torch random function called inside returns the next recorded draw
    of ``random_draws.pt`` instead of drawing, after checking that it is of the same kind
    (:data:`_DRAW_KINDS`), shape, dtype class and, where given, the same parameters (range, mean,
    std). A draw with no recorded counterpart raises at once; :meth:`check_all_used` raises if any
    recorded draw was not consumed. ``used`` lists ``(reference function, our function)``."""

    _TORCH = ("randn", "rand", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
              "bernoulli", "multinomial", "poisson")
    _TENSOR = ("normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_")

    def __init__(self, draws: Sequence[Mapping[str, Any]], transform: Optional[Callable[[int, Tensor], Tensor]] = None):
        self.draws = list(draws)
        self.transform = transform
        self.position = 0
        self.used: List[Tuple[str, str]] = []
        self._saved: Dict[Tuple[Any, str], Any] = {}

    def __enter__(self):
        for name in self._TORCH:
            self._patch(torch, name, f"torch.{name}")
        for name in self._TENSOR:
            self._patch(torch.Tensor, name, f"torch.Tensor.{name}")
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        return False

    def _patch(self, owner, name, full):
        original = getattr(owner, name)
        self._saved[(owner, name)] = original
        replay = self

        def wrapper(*args, **kwargs):
            return replay._next(full, args, kwargs)

        setattr(owner, name, wrapper)

    def check_all_used(self) -> None:
        if self.position != len(self.draws):
            left = [f"#{d.get('index', i)} {d['function']} {d['shape']} at {d.get('caller')}"
                    for i, d in enumerate(self.draws[self.position:], self.position)]
            raise DrawReplayError(f"{len(left)} recorded random draws were never used by our forward: {left}")

    def _next(self, ours: str, args, kwargs) -> Tensor:
        where = f"our call {ours}"
        if self.position >= len(self.draws):
            raise DrawReplayError(f"{where} (draw #{self.position}) has no recorded counterpart: the reference drew "
                                  f"only {len(self.draws)} times")
        rec = self.draws[self.position]
        ref_fn = rec["function"]
        if _KIND_OF.get(ref_fn) != _KIND_OF.get(ours):
            raise DrawReplayError(f"{where} is a {_KIND_OF.get(ours)} draw but recorded draw #{self.position} is "
                                  f"{ref_fn} ({_KIND_OF.get(ref_fn)}) at {rec.get('caller')}")
        inplace = ours.startswith("torch.Tensor.")
        like = ours.endswith("_like")
        if inplace:
            target = args[0]
            shape, dtype, device = tuple(target.shape), target.dtype, target.device
            params = args[1:]
        elif like:
            src = args[0]
            shape, device = tuple(src.shape), src.device
            dtype = kwargs.get("dtype") or src.dtype
            params = args[1:]
        else:
            shape = _shape_from(args, kwargs)
            default = torch.int64 if ours in ("torch.randint", "torch.randperm") else torch.get_default_dtype()
            dtype = kwargs.get("dtype") or default
            device = kwargs.get("device") or torch.device("cpu")
            bounds = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            params = tuple(bounds) if ours == "torch.randint" else ()
        if list(shape) != list(rec["shape"]):
            raise DrawReplayError(f"{where} draws shape {list(shape)} but recorded draw #{self.position} ({ref_fn} at "
                                  f"{rec.get('caller')}) has {rec['shape']}")
        value: Tensor = rec["tensor"]
        if value.is_floating_point() != torch.empty((), dtype=dtype).is_floating_point():
            raise DrawReplayError(f"{where} draws {dtype} but recorded draw #{self.position} ({ref_fn}) is {value.dtype}")
        self._check_params(ours, params, kwargs, rec)
        if self.transform is not None:
            value = self.transform(self.position, value)
        value = value.to(device=device, dtype=dtype)
        self.used.append((ref_fn, ours))
        self.position += 1
        if inplace:
            with torch.no_grad():
                args[0].copy_(value)
            return args[0]
        return value.clone()

    def _check_params(self, ours: str, params, kwargs, rec) -> None:
        kind = _KIND_OF[ours]

        def numbers(fn, args, kw):
            if kind == "normal":
                if fn in ("torch.randn", "torch.randn_like"):
                    return (0.0, 1.0)
                a = list(args) + [None, None]
                return (kw.get("mean", a[0] if a[0] is not None else 0.0), kw.get("std", a[1] if a[1] is not None else 1.0))
            if kind == "uniform":
                if fn in ("torch.rand", "torch.rand_like"):
                    return (0.0, 1.0)
                a = list(args) + [None, None]
                return (kw.get("from", a[0] if a[0] is not None else 0.0), kw.get("to", a[1] if a[1] is not None else 1.0))
            return None

        mine = numbers(ours, params, kwargs)
        ref_args = [a for a in rec.get("args", []) if not isinstance(a, Mapping)]
        theirs = numbers(rec["function"], ref_args, rec.get("kwargs", {}))
        if mine is not None and theirs is not None and tuple(map(float, mine)) != tuple(map(float, theirs)):
            raise DrawReplayError(f"our call {ours} draws with parameters {mine} but recorded draw #{self.position} "
                                  f"({rec['function']}) used {theirs}")
        if kind == "integer":  # the recorded values must lie in our range
            if ours == "torch.randint_like" or ours == "torch.randint":
                low = kwargs.get("low", params[0] if len(params) >= 2 else 0)
                high = kwargs.get("high", params[1] if len(params) >= 2 else (params[0] if params else None))
                v = rec["tensor"]
                if high is not None and v.numel() and (v.min() < low or v.max() >= high):
                    raise DrawReplayError(f"recorded draw #{self.position} ({rec['function']}) has values outside our "
                                          f"range [{low}, {high})")


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
_SUFFIX_RE = re.compile(r"^(.*?)(_\d+)?$")


def map_loss_key(method: str, ref_key: str, ours: Mapping[str, Any]) -> Optional[str]:
    """Our key of a reference loss key (``None`` when it has none)."""
    table = LOSS_KEY_MAP.get(method, {})
    base, suffix = _SUFFIX_RE.match(ref_key).groups()
    suffix = suffix or ""
    if base in table:
        key = table[base] + suffix
        return key if key in ours else None
    if ref_key in table:
        return table[ref_key] if table[ref_key] in ours else None
    if ref_key.startswith("loss_") and ref_key in ours:
        return ref_key
    return None


@dataclass
class DistillParityResult:
    fixture: str
    terms: List[Dict[str, Any]] = field(default_factory=list)
    unmapped_ref_keys: List[str] = field(default_factory=list)
    extra_keys: List[str] = field(default_factory=list)
    grad_global_norm: Dict[str, float] = field(default_factory=dict)
    grad_failures: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    losses: Dict[str, float] = field(default_factory=dict)
    grad_worst: Dict[str, float] = field(default_factory=dict)

    @property
    def term_failures(self) -> List[Dict[str, Any]]:
        tol = TOLERANCES
        return [t for t in self.terms if not t["abs_diff"] <= tol["loss_atol"] + tol["loss_rtol"] * abs(t["ref"])]

    @property
    def grad_norm_ok(self) -> bool:
        g = self.grad_global_norm
        return bool(g) and abs(g["ours"] - g["ref"]) <= TOLERANCES["grad_norm_rtol"] * abs(g["ref"])

    @property
    def passed(self) -> bool:
        return (not self.errors and not self.unmapped_ref_keys and not self.extra_keys and bool(self.terms)
                and not self.term_failures and self.grad_norm_ok and not self.grad_failures)

    @property
    def max_abs_diff(self) -> float:
        return max((t["abs_diff"] for t in self.terms), default=float("nan"))

    def to_json(self) -> Dict[str, Any]:
        return {
            "fixture": self.fixture,
            "pass": self.passed,
            "terms": self.terms,
            "unmapped_ref_keys": self.unmapped_ref_keys,
            "grad_global_norm": self.grad_global_norm,
        }

    def report(self, verbose: bool = True) -> str:
        lines = [f"distill parity {self.fixture}: {'PASS' if self.passed else 'FAIL'}"]
        for e in self.errors:
            lines.append(f"  ERROR {e}")
        if verbose and self.terms:
            lines.append(f"  {'reference key':<28} {'our key':<40} {'reference':>14} {'ours':>14} {'|diff|':>10}")
            bad = {id(t) for t in self.term_failures}
            for t in self.terms:
                flag = " FAIL" if id(t) in bad else ""
                lines.append(f"  {t['ref_key']:<28} {t['key']:<40} {t['ref']:>14.6f} {t['ours']:>14.6f} "
                             f"{t['abs_diff']:>10.2e}{flag}")
        if self.unmapped_ref_keys:
            lines.append(f"  unmapped reference keys: {self.unmapped_ref_keys}")
        if self.extra_keys:
            lines.append(f"  our keys without a reference counterpart: {self.extra_keys}")
        if self.terms:
            lines.append(f"  terms: {len(self.terms)}, max |diff| {self.max_abs_diff:.2e}, "
                         f"{len(self.term_failures)} beyond {TOLERANCES['loss_atol']:g} + {TOLERANCES['loss_rtol']:g}*|ref|")
        if self.grad_global_norm:
            g = self.grad_global_norm
            rel = abs(g["ours"] - g["ref"]) / max(abs(g["ref"]), 1e-30)
            lines.append(f"  gradient global norm: reference {g['ref']:.6f}, ours {g['ours']:.6f}, relative {rel:.2e} "
                         f"({'ok' if self.grad_norm_ok else 'FAIL'}, <= {TOLERANCES['grad_norm_rtol']:g})")
        if self.grad_worst:
            w = self.grad_worst
            lines.append(f"  gradients per key ({int(w.get('keys', 0))} keys): worst relative sum_abs {w.get('sum_abs', 0):.2e}, "
                         f"max_abs {w.get('max_abs', 0):.2e}; {len(self.grad_failures)} beyond tolerance")
        for f in self.grad_failures[:10]:
            lines.append(f"  grad FAIL {f}")
        if verbose:
            for n in self.notes:
                lines.append(f"  note: {n}")
        return "\n".join(lines)


def _load_json(path: Path, name: str) -> Any:
    p = path / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing (a distillation fixture needs config.json, keys.json, losses.json, "
                                "grad_checksums.json, input.pt, random_draws.pt)")
    return json.loads(p.read_text())


def _parameter_map(model: nn.Module, keys: Sequence[Sequence], alias_groups: Sequence[Sequence[str]]) -> Dict[str, str]:
    """Reference key -> our parameter/buffer name, by converting marker tensors (every key, or alias
    group, a distinct constant) through the distiller's own checkpoint converter."""
    from .parity import marker_key_map

    return marker_key_map(keys, alias_groups, model.convert_detrex_state_dict)


def _check_grads(model: nn.Module, fixture: Dict[str, Any], result: DistillParityResult) -> None:
    tol = TOLERANCES
    ref = fixture["grads"]
    params = dict(model.named_parameters())
    kmap = _parameter_map(model, fixture["keys"], fixture["config"].get("alias_groups", []))
    worst = {"sum_abs": 0.0, "max_abs": 0.0, "keys": 0}
    for key, entry in ref["per_key"].items():
        name = kmap.get(key)
        p = params.get(name)
        if p is None:
            result.grad_failures.append(f"{key}: no parameter of ours (mapped to {name!r})")
            continue
        g = p.grad
        if entry is None:
            if g is not None and float(g.abs().sum()) > 0:
                result.grad_failures.append(f"{key}: gets a gradient, the reference's has none")
            continue
        if g is None:
            result.grad_failures.append(f"{key} ({name}): no gradient, the reference's has one")
            continue
        g = g.double()
        s, sa, ma = float(g.sum()), float(g.abs().sum()), float(g.abs().max())
        rs, rsa, rma = entry
        worst["keys"] += 1
        # relative, with the absolute floor as the smallest denominator (near-zero gradients are noise)
        worst["sum_abs"] = max(worst["sum_abs"], abs(sa - rsa) / max(abs(rsa), tol["sum_abs_atol"] / tol["sum_abs_rtol"]))
        worst["max_abs"] = max(worst["max_abs"], abs(ma - rma) / max(abs(rma), tol["max_abs_atol"] / tol["max_abs_rtol"]))
        if (abs(sa - rsa) > tol["sum_abs_atol"] + tol["sum_abs_rtol"] * abs(rsa)
                or abs(ma - rma) > tol["max_abs_atol"] + tol["max_abs_rtol"] * abs(rma)
                or abs(s - rs) > tol["sum_rel"] * abs(rsa) + tol["sum_atol"]):
            result.grad_failures.append(f"{key} ({name}): ours sum/sum_abs/max_abs {s:.6g}/{sa:.6g}/{ma:.6g}, "
                                        f"reference {rs:.6g}/{rsa:.6g}/{rma:.6g}")
    result.grad_worst = worst
    seen, sq = set(), 0.0
    for name, p in model.named_parameters():
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            sq += float(p.grad.double().pow(2).sum())
    result.grad_global_norm = {"ref": float(ref["global_l2_norm"]), "ours": math.sqrt(sq)}


def load_distill_fixture(path) -> Dict[str, Any]:
    path = Path(path)
    draws_file = path / "random_draws.pt"
    return {
        "path": path,
        "config": _load_json(path, "config.json"),
        "keys": _load_json(path, "keys.json"),
        "losses": _load_json(path, "losses.json"),
        "grads": _load_json(path, "grad_checksums.json"),
        "fill_checksums": json.loads((path / "fill_checksums.json").read_text()) if (path / "fill_checksums.json").is_file() else None,
        "input": torch.load(path / "input.pt", map_location="cpu", weights_only=False),
        "draws": torch.load(draws_file, map_location="cpu", weights_only=False) if draws_file.is_file() else {"draws": []},
    }


def fixture_name(config: Mapping[str, Any], path: Path) -> str:
    family, name = config.get("family"), config.get("fixture")
    if name and "/" in str(name):
        return str(name)
    return f"{family}/{name}" if family and name else path.name


def run_distill_fixture(
    path,
    reference_flags: bool = True,
    extra_overrides: Sequence[str] = (),
    draw_transform: Optional[Callable[[int, Tensor], Tensor]] = None,
    fixture: Optional[Dict[str, Any]] = None,
) -> DistillParityResult:
    """One fixture through our distiller (see the module docstring). ``reference_flags=False`` runs
    the clean defaults; ``extra_overrides`` are applied after everything else; ``draw_transform``
    ``(index, tensor) -> tensor`` alters the injected draws (to show that they are used)."""
    fixture = fixture or load_distill_fixture(path)
    config = fixture["config"]
    result = DistillParityResult(fixture_name(config, Path(path)))
    method = base_method(config)
    if method not in LOSS_KEY_MAP:
        result.errors.append(f"no loss-key mapping for the reference method {method!r} (known: {sorted(LOSS_KEY_MAP)})")
        return result
    model, result.overrides, result.notes = build_distiller(config, reference_flags, extra_overrides)
    result.notes.insert(0, f"config {our_config_file(config).relative_to(REPO_ROOT)} with overrides: "
                           + " ".join(result.overrides))

    # weights: fill the reference's keys, load through the normal init-checkpoint path
    sd = fill_state_dict(fixture["keys"], config.get("alias_groups", []))
    if fixture["fill_checksums"]:
        off = [k for k, (s, sa, first) in fixture["fill_checksums"].items()
               if abs(float(sd[k].double().sum()) - s) > 1e-6 * max(abs(s), 1.0)
               or abs(float(sd[k].double().abs().sum()) - sa) > 1e-6 * max(abs(sa), 1.0)]
        if off:
            result.errors.append(f"the fill does not reproduce fill_checksums.json for {len(off)} keys, e.g. {off[:3]}")
    report = model.load_init_checkpoint(sd)
    for what in ("student_missing", "methods_missing", "unexpected", "dropped"):
        if report[what]:
            result.errors.append(f"init checkpoint: {len(report[what])} {what.replace('_', ' ')} keys, e.g. {report[what][:5]}")

    # one training step with the recorded draws
    forward = config.get("forward", {})
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(int(forward.get("forward_seed", 0)))
    replay = DrawReplay(fixture["draws"].get("draws", []), draw_transform)
    from .parity import _train_inputs  # the fixtures' input layout, shared with the detector parity

    inputs = _train_inputs(fixture["input"]["batched_inputs"])
    try:
        with replay:
            losses = model(inputs)
        replay.check_all_used()
    except DrawReplayError as e:
        result.errors.append(str(e))
        return result
    total = sum(losses.values())
    total.backward()
    result.losses = {k: float(v.detach()) for k, v in losses.items()}
    result.notes.append(f"random draws injected: {len(replay.used)} "
                        f"({', '.join(f'{r} as {o}' for r, o in replay.used) or 'none'})")

    ref_losses = fixture["losses"]["losses"]
    mapped = set()
    for ref_key in fixture["losses"].get("loss_keys", list(ref_losses)):
        key = map_loss_key(method, ref_key, losses)
        if key is None:
            result.unmapped_ref_keys.append(ref_key)
            continue
        mapped.add(key)
        ref, ours = float(ref_losses[ref_key]), float(losses[key].detach())
        result.terms.append({"ref_key": ref_key, "key": key, "ref": ref, "ours": ours, "abs_diff": abs(ref - ours)})
    result.extra_keys = sorted(set(losses) - mapped)
    _check_grads(model, fixture, result)
    return result
