"""Build objects from lazy configs: ``instantiate`` and dotted-path helpers.

A *lazy node* is a mapping with a ``_target_`` key: the target is a callable (or the dotted
import path of one, e.g. ``"torchvision.models.resnet.ResNet"``) and every other key is a keyword
argument. :func:`instantiate` walks a config tree, builds the innermost nodes first and passes the
results to their parents.
"""
from __future__ import annotations

import builtins
import difflib
import importlib
import inspect
from collections import abc
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "instantiate",
    "locate",
    "dotted_name",
    "InstantiationError",
    "TARGET_KEY",
]

TARGET_KEY = "_target_"


class InstantiationError(RuntimeError):
    """Building a lazy node failed; the message names the target and the config path."""

    def __init__(self, message: str, target: Optional[str] = None, path: str = "", user_error: bool = False):
        super().__init__(message)
        self.target = target
        self.path = path
        #: True when the config itself is at fault (a ``_target_`` that cannot be found, arguments
        #: the target does not take): the engine reports it as one line (tprd/engine/defaults.py).
        #: Errors raised by the target are this error's ``__cause__`` and judged on their own.
        self.user_error = user_error


# --------------------------------------------------------------------------------------------
# Dotted paths
# --------------------------------------------------------------------------------------------
def locate(name: str) -> Any:
    """Return the object that the dotted path ``name`` refers to.

    The longest importable module prefix is imported and the remaining parts are looked up as
    attributes, so ``"pkg.module.Class"``, ``"pkg.module.Class.method"`` and
    ``"pkg.module.Class.Inner"`` all work. A single name (``"dict"``) is looked up in builtins.
    """
    if not isinstance(name, str) or not name.strip():
        raise ImportError(f"Cannot locate {name!r}: expected a non-empty dotted path string.")
    name = name.strip()
    if name.startswith("<"):
        # Placeholder written by LazyConfig.save for values it could not serialise.
        raise ImportError(
            f"Cannot locate {name!r}: this is a placeholder written when the config was saved "
            "because the original value (a lambda, local function or other object) has no import "
            "path. Replace it with an importable callable."
        )
    parts = name.split(".")
    if any(not p for p in parts):
        raise ImportError(f"Cannot locate {name!r}: malformed dotted path.")

    if len(parts) == 1 and hasattr(builtins, parts[0]):
        return getattr(builtins, parts[0])

    module = None
    n_module = 0
    first_error: Optional[BaseException] = None
    for i in range(len(parts), 0, -1):
        mod_name = ".".join(parts[:i])
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            # Only "this module does not exist" is a reason to try a shorter prefix; a module that
            # exists but fails to import should report its own error.
            missing = getattr(e, "name", None) or ""
            if missing and (mod_name == missing or mod_name.startswith(missing + ".")):
                continue
            raise ImportError(f"Cannot locate {name!r}: importing {mod_name!r} failed: {e}") from e
        except ImportError as e:  # pragma: no cover - unusual import failures
            first_error = first_error or e
            continue
        n_module = i
        break
    if module is None and hasattr(builtins, parts[0]):
        module, n_module = builtins, 0  # e.g. "dict.fromkeys"
    if module is None:
        msg = f"Cannot locate {name!r}: no module named {parts[0]!r}."
        if first_error is not None:
            msg += f" ({first_error})"
        raise ImportError(msg)

    obj: Any = module
    for j in range(n_module, len(parts)):
        attr = parts[j]
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        # Maybe a submodule that the parent package does not import eagerly.
        if inspect.ismodule(obj):
            sub = f"{obj.__name__}.{attr}"
            try:
                obj = importlib.import_module(sub)
                continue
            except ImportError:
                pass
        owner = ".".join(parts[:j])
        available = [a for a in dir(obj) if not a.startswith("_")]
        close = difflib.get_close_matches(attr, available, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ImportError(f"Cannot locate {name!r}: {owner!r} has no attribute {attr!r}.{hint}")
    return obj


def _is_local_or_lambda(obj: Any) -> bool:
    qualname = getattr(obj, "__qualname__", "") or ""
    return "<lambda>" in qualname or "<locals>" in qualname


def dotted_name(obj: Any) -> Optional[str]:
    """The import path ``module.qualname`` of a class/function, or None if it has none.

    A path is only returned when :func:`locate` maps it back to the same object, so lambdas,
    local functions and callables defined inside config files return None. Built-ins that report
    a private module or class (``torch.relu`` says ``_VariableFunctionsClass.relu``) are looked
    up under the public parents of their module too.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    name = getattr(obj, "__name__", None)
    if not isinstance(qualname, str) or _is_local_or_lambda(obj) or module == "__main__":
        return None
    if not isinstance(module, str):
        # Methods of built-in classes (dict.fromkeys, torch.Tensor.add) know only their class.
        owner = getattr(obj, "__objclass__", None) or getattr(obj, "__self__", None)
        owner_path = dotted_name(owner) if inspect.isclass(owner) else None
        if owner_path is None or not isinstance(name, str):
            return None
        module, qualname = owner_path, name
        path = f"{owner_path}.{name}"
        try:
            found = locate(path)
            return path if (found is obj or found == obj) is True else None
        except Exception:
            return None
    modules = [module]
    if module.startswith("_") and module.lstrip("_"):
        modules.insert(0, module.lstrip("_"))  # _operator -> operator
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):  # public parents: torch._C._nn -> torch
        if not any(p.startswith("_") for p in parts[:i]):
            modules.append(".".join(parts[:i]))
    attrs = [qualname] + ([name] if isinstance(name, str) and name != qualname else [])
    for mod in modules:
        for attr in attrs:
            path = attr if mod == "builtins" else f"{mod}.{attr}"
            try:
                found = locate(path)
            except Exception:
                continue
            try:
                same = found is obj or found == obj
            except Exception:  # pragma: no cover - objects with odd __eq__
                same = False
            if same is True:
                return path
    return None


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = dotted_name(target)
    if name is not None:
        return name
    return getattr(target, "__qualname__", None) or repr(target)


# --------------------------------------------------------------------------------------------
# instantiate
# --------------------------------------------------------------------------------------------
def _full_key(cfg: Any) -> str:
    """Dotted path of an omegaconf node inside its root config ("" for the root)."""
    try:
        key = cfg._get_full_key("")
    except Exception:
        return ""
    return "" if key is None else str(key)


def _join(path: str, key: Any) -> str:
    if path == "":
        return str(key)
    return f"{path}.{key}"


def _to_plain(cfg: Any, path: str) -> Any:
    """Resolve interpolations and turn an omegaconf container into plain dicts/lists.

    Objects stored in the config (callables, tensors, modules) are kept as they are.
    """
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None) or path or "<root>"
        raise InstantiationError(
            f"Cannot instantiate config at {path or '<root>'!r}: resolving value {where!r} failed: "
            f"{type(e).__name__}: {_first_line(e)}",
            path=str(where),
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def instantiate(cfg: Any, _path: Optional[str] = None) -> Any:
    """Recursively build the objects described by ``cfg``.

    - a mapping with ``_target_``: call the target (callable or dotted path) with the other keys,
      each instantiated first;
    - a mapping without ``_target_``: a plain ``dict`` of instantiated values;
    - a list / tuple / ListConfig: a list (tuple stays tuple) of instantiated elements;
    - anything else (numbers, strings, tensors, modules, objects) is returned unchanged.

    omegaconf interpolations such as ``${..num_classes}`` are resolved against the whole config
    the node belongs to. Errors name the target and the dotted config path of the failing node.
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        path = _full_key(cfg) if _path is None else _path
        plain = _to_plain(cfg, path)
        return _build(plain, path)
    return _build(cfg, _path or "")


def _build(node: Any, path: str) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        # Config objects hidden inside non-config containers (e.g. a dict of DictConfigs).
        return instantiate(node, _path=path)
    if isinstance(node, abc.Mapping):
        if TARGET_KEY in node:
            return _call(node, path)
        return {k: _build(v, _join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_build(v, _join(path, i)) for i, v in enumerate(node)]
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return tuple(_build(v, _join(path, i)) for i, v in enumerate(node))
    return node


def _call(node: abc.Mapping, path: str) -> Any:
    target = node[TARGET_KEY]
    where = path or "<root>"
    if isinstance(target, (abc.Mapping, DictConfig)):
        # A target that is itself a lazy node (e.g. a factory built from config).
        target = _build(target, _join(path, TARGET_KEY))
    if isinstance(target, str):
        try:
            target_obj = locate(target)
        except ImportError as e:
            raise InstantiationError(
                f"Cannot instantiate {target!r} at config path {where!r}: {e}",
                target=target,
                path=path,
                user_error=True,
            ) from e
    else:
        target_obj = target
    name = _target_name(target)
    if not callable(target_obj):
        raise InstantiationError(
            f"Cannot instantiate {name!r} at config path {where!r}: _target_ is not callable "
            f"(got {type(target_obj).__name__}).",
            target=name,
            path=path,
        )
    kwargs = {}
    for k, v in node.items():
        if k == TARGET_KEY:
            continue
        if not isinstance(k, str):
            raise InstantiationError(
                f"Cannot instantiate {name!r} at config path {where!r}: argument names must be "
                f"strings, got {k!r}.",
                target=name,
                path=path,
            )
        kwargs[k] = _build(v, _join(path, k))
    _check_arguments(target_obj, kwargs, name, where, path)
    try:
        return target_obj(**kwargs)
    except InstantiationError:
        raise
    except Exception as e:
        raise InstantiationError(
            f"Error instantiating {name!r} at config path {where!r}: {type(e).__name__}: {e}",
            target=name,
            path=path,
        ) from e


def _check_arguments(target: Any, kwargs: dict, name: str, where: str, path: str) -> None:
    """Config keys the target does not take, or required arguments the config lacks, are an error
    in the config: say so before calling (an error inside the target stays the target's)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        raise InstantiationError(
            f"Cannot instantiate {name!r} at config path {where!r}: {e}; it takes: {', '.join(accepted) or 'nothing'}. "
            f"Check the keys under {where!r} in the config and the overrides.",
            target=name,
            path=path,
            user_error=True,
        ) from e
