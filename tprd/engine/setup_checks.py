"""Checks of a run's set-up that :func:`tprd.engine.main.main` does before it writes anything.

Everything here can fail on the user's files and values (device, datasets, class counts, weight
files, a resumed run's config, a distillation set-up); each failure is a one-line user error
(:mod:`tprd.errors`). They run before the output folder, ``log.txt`` or ``config.yaml`` are
touched, so a refused run leaves an earlier run's folder as it was. Datasets loaded here are
handed to the loaders that the run builds next (:meth:`tprd.data.DatasetCatalog.preload`), so
nothing is read twice.
"""
from __future__ import annotations

import logging
import os
from collections import abc
from typing import Any, Dict, List, Optional, Tuple

import torch

from tprd.checkpoint import check_weight_file
from tprd.config.select import select_value
from tprd.errors import DatasetError, DeviceError, SetupError

__all__ = ["check_setup", "check_resume_config", "config_differences", "preload_datasets", "check_init_file",
           "check_num_classes"]

logger = logging.getLogger("tprd.engine")


_get = select_value  # one dotted config entry, or a default


# ---------------------------------------------------------------------------------------- datasets
def _dataset_node(cfg: Any, split: str) -> Optional[Any]:
    node = _get(cfg, f"dataloader.{split}.dataset")
    if node is None or not hasattr(node, "get"):
        return None
    target = node.get("_target_")
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if not str(name).endswith("get_detection_dataset") and not str(name).endswith("get_detection_dataset_dicts"):
        return None  # a custom dataset: checked when it is built
    return node


def preload_datasets(cfg: Any, splits: Tuple[str, ...]) -> None:
    """Load and check the named datasets of ``dataloader.<split>.dataset`` (for the usual
    ``get_detection_dataset`` node); the loaders get them without reading them again."""
    from tprd.data import DatasetCatalog
    from tprd.data.catalog import resolve_dataset_names
    from tprd.data.loader import check_dataset_parts

    for split in splits:
        node = _dataset_node(cfg, split)
        if node is None:
            continue
        names = resolve_dataset_names(node.get("names"))
        strict = bool(node.get("strict", False))
        parts = [DatasetCatalog.preload(name, strict=strict) for name in names]
        check_dataset_parts(names, parts, bool(node.get("filter_empty", True)))


# ----------------------------------------------------------------------------------------- resume
def config_differences(old: Any, new: Any, prefix: str, limit: int = 12) -> List[str]:
    """``path: old -> new`` (and ``path: added`` / ``removed``) for the leaves that differ."""
    out: List[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(a, abc.Mapping) and isinstance(b, abc.Mapping):
            for key in list(a) + [k for k in b if k not in a]:
                sub = f"{path}.{key}"
                if key not in b:
                    out.append(f"{sub} (only in the run's config)")
                elif key not in a:
                    out.append(f"{sub} (only in the given config)")
                else:
                    walk(a[key], b[key], sub)
            return
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}.{i}")
            return
        if a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(old, new, prefix)
    return out


def _structure(node: Any) -> Any:
    """What makes a model another model: the tree of its ``_target_`` classes (detectors, their parts,
    the distillation methods, by their config keys). Numbers may change on a resume (a weight, a
    schedule); a changed width or count of a part is refused by the checkpoint load anyway."""
    if isinstance(node, abc.Mapping):
        out = {}
        for k, v in node.items():
            if k == "_target_":
                out[k] = v
            else:
                sub = _structure(v)
                if sub not in (None, {}, []):
                    out[k] = sub
        return out
    if isinstance(node, list):
        items = [_structure(v) for v in node]
        return items if any(i not in (None, {}, []) for i in items) else None
    return None


def check_resume_config(cfg: Any, args: Any) -> None:
    """``--resume`` of a run whose ``config.yaml`` has another model (the detector classes of
    student and teacher, their parts, the set of distillation methods) is refused, naming the
    differing keys, unless ``--allow-config-change`` is given."""
    if not getattr(args, "resume", False) or getattr(args, "eval_only", False):
        return
    output_dir = str(_get(cfg, "train.output_dir", "") or "")
    saved = os.path.join(output_dir, "config.yaml")
    if not output_dir or not os.path.isfile(os.path.join(output_dir, "last_checkpoint")) or not os.path.isfile(saved):
        return
    from tprd.config import LazyConfig, normalize_config

    try:
        old = normalize_config(LazyConfig.load(saved).get("model"))
    except Exception as e:  # an unreadable config.yaml: the checkpoint load decides
        logger.warning(f"--resume: cannot read {saved} to compare it with the given config ({e})")
        return
    new = normalize_config(cfg.get("model"))
    diffs = config_differences(_structure(old), _structure(new), "model")
    if not diffs:
        return
    if getattr(args, "allow_config_change", False):
        logger.warning("--resume with --allow-config-change: the model differs from the run's config.yaml in "
                       + "; ".join(diffs))
        return
    raise SetupError(
        f"--resume: the given config ({getattr(args, 'config_file', '')}) has another model or distillation "
        f"methods than the run in {output_dir} ({saved}): " + "; ".join(diffs)
        + ". Resuming would mix two set-ups in one run (checkpoints, metrics.json). Resume with the config the run "
        "was started with, start a new run in another train.output_dir, or add --allow-config-change to resume anyway"
    )


# -------------------------------------------------------------------- device, init file, classes
def _device(cfg) -> torch.device:
    name = str(_get(cfg, "train.device", "cuda"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"train.device={name!r} but CUDA is not available on this machine; add the override "
            "train.device=cpu to run on the CPU."
        )
    return device


def check_init_file(cfg, args) -> None:
    """``train.init_checkpoint`` exists and is a weight file (a quick look, see
    :func:`tprd.checkpoint.check_weight_file`), before the output folder is made."""
    init = str(_get(cfg, "train.init_checkpoint", "") or "")
    if init and not args.resume:
        if not os.path.exists(init):
            raise FileNotFoundError(f"train.init_checkpoint {init!r} does not exist.")
        check_weight_file(init)


def _find_key(node: Any, key: str, prefix: str) -> List[tuple]:
    """``(dotted path, value)`` of every ``key`` entry in a config tree."""
    found = []
    if isinstance(node, abc.Mapping) or hasattr(node, "items") and hasattr(node, "keys"):
        for k, v in node.items():
            path = f"{prefix}.{k}"
            if k == key and not isinstance(v, (abc.Mapping, list, tuple)) and not hasattr(v, "keys"):
                found.append((path, v))
            else:
                found.extend(_find_key(v, key, path))
    elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        for i, v in enumerate(node):
            found.extend(_find_key(v, key, f"{prefix}.{i}"))
    return found


def _dataset_names(cfg, split: str) -> List[str]:
    names = _get(cfg, f"dataloader.{split}.dataset.names")
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names]


def check_num_classes(cfg, split: str = "train") -> None:
    """Every ``num_classes`` in ``cfg.model`` must equal the dataset's number of classes.

    Raises ``ValueError`` naming the config paths, the dataset and the override that fixes it.
    """
    names = _dataset_names(cfg, split)
    if not names:
        return
    try:
        from tprd.data import MetadataCatalog
    except ImportError:  # pragma: no cover - data package not available
        return
    counts = {}
    for name in names:
        try:
            classes = MetadataCatalog.get(name).get("thing_classes")
        except Exception:
            classes = None
        if classes is not None:
            counts[name] = len(classes)
    if not counts:
        return
    if len(set(counts.values())) > 1:
        raise DatasetError(f"The datasets of dataloader.{split}.dataset.names have different class counts: {counts}.")
    n = next(iter(counts.values()))
    wrong = [(p, v) for p, v in _find_key(cfg.model, "num_classes", "model") if v is not None and int(v) != n]
    if wrong:
        fix = " ".join(f"{p}={n}" for p, _ in wrong)
        raise DatasetError(
            f"Class count mismatch: dataset(s) {list(counts)} have {n} classes but "
            + ", ".join(f"{p}={v}" for p, v in wrong)
            + f". Override on the command line: {fix}"
        )


# ----------------------------------------------------------------------------------------- all
def check_setup(cfg: Any, args: Any) -> List[str]:
    """Every check that needs no model: device, init file, resumed config, distillation set-up,
    datasets and class counts. Returns warnings to log once logging is set up."""
    from tprd.distill.setup_checks import check_distill_config

    _device(cfg)
    check_init_file(cfg, args)
    check_resume_config(cfg, args)
    warnings = check_distill_config(cfg, args)
    splits = ("test",) if getattr(args, "eval_only", False) else ("train", "test")
    preload_datasets(cfg, splits)
    for split in splits:
        check_num_classes(cfg, split)
    check_evaluator(cfg)
    return warnings


def check_evaluator(cfg: Any) -> None:
    """Build ``dataloader.evaluator`` once (it only reads its dataset's metadata) so that an evaluator
    of the wrong kind for the test set stops the run now, not after training."""
    node = _get(cfg, "dataloader.evaluator")
    if node is None or _get(cfg, "dataloader.test") is None:
        return
    from tprd.config import instantiate

    instantiate(node)
