"""Lazy, Python-file configs: ``LazyCall`` to describe objects, ``LazyConfig`` to load, override,
save and print them.

A config file is plain Python. Executing it yields its top-level variables; the ones that hold
dicts, lists or lazy nodes (``L(Class)(arg=...)``) form the loaded config. Relative imports between
config files (``from ..common.train import train``) work without ``__init__.py`` files: each
imported config file is executed afresh, so every load gets its own independent copy of what it
imports. Nothing is built while loading; :func:`tprd.config.instantiate` builds objects later.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import enum
import inspect
import itertools
import logging
import os
import traceback
import types
from collections import abc
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from .instantiate import TARGET_KEY, dotted_name, locate

__all__ = [
    "LazyCall",
    "L",
    "LazyConfig",
    "ConfigLoadError",
    "ConfigOverrideError",
    "get_config",
    "normalize_config",
    "config_root",
]

logger = logging.getLogger(__name__)

_FLAGS = {"allow_objects": True}
_LOADER_PACKAGE = "tprd._cfg_loader"
_counter = itertools.count()
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ConfigLoadError(RuntimeError):
    """A config file could not be loaded; the message names the file and line."""

    def __init__(self, message: str, filename: Optional[str] = None, lineno: Optional[int] = None):
        super().__init__(message)
        self.filename = filename
        self.lineno = lineno


class ConfigOverrideError(KeyError):
    """A command-line override could not be applied (unknown key, bad syntax)."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# LazyCall
# --------------------------------------------------------------------------------------------
class LazyCall:
    """Describe a call without making it: ``L(Class)(a=1)`` -> config ``{_target_: Class, a: 1}``.

    The target may be any callable or the dotted import path of one. Only keyword arguments are
    accepted, so that every argument is a named, overridable config key.
    """

    def __init__(self, target: Any):
        if not (callable(target) or isinstance(target, (str, abc.Mapping))):
            raise TypeError(
                f"LazyCall target must be a callable or a dotted import path string, got "
                f"{type(target).__name__}: {target!r}"
            )
        self._target = target

    def __call__(self, *args: Any, **kwargs: Any) -> DictConfig:
        if args:
            raise TypeError(
                f"LazyCall({_describe(self._target)}) accepts keyword arguments only; got "
                f"{len(args)} positional argument(s). Name each argument so it can be overridden."
            )
        content: Dict[str, Any] = {TARGET_KEY: self._target}
        content.update(kwargs)
        return DictConfig(content=content, flags=dict(_FLAGS))

    def __repr__(self) -> str:
        return f"LazyCall({_describe(self._target)})"


L = LazyCall


def _describe(target: Any) -> str:
    if isinstance(target, str):
        return target
    return dotted_name(target) or getattr(target, "__qualname__", None) or repr(target)


# --------------------------------------------------------------------------------------------
# Loading Python config files
# --------------------------------------------------------------------------------------------
def _as_config(value: Any) -> Any:
    """Turn plain dicts/lists into omegaconf containers that may hold arbitrary objects."""
    if isinstance(value, (DictConfig, ListConfig)):
        return value
    if isinstance(value, abc.Mapping):
        return DictConfig(content=dict(value), flags=dict(_FLAGS))
    if isinstance(value, list):
        return ListConfig(content=value, flags=dict(_FLAGS))
    return value


def _is_config_value(name: str, value: Any) -> bool:
    if name.startswith("_"):
        return False
    return isinstance(value, (DictConfig, ListConfig, abc.Mapping, list))


class _ConfigDirModule(types.ModuleType):
    """A folder of config files seen through ``from . import folder``; files load on access."""

    def __init__(self, name: str, directory: Path, loader: "_Loader"):
        super().__init__(name)
        self.__file__ = str(directory)
        self.__path__ = [str(directory)]
        self._tprd_dir = directory
        self._tprd_loader = loader

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        child = self._tprd_loader.resolve_child(self._tprd_dir, attr)
        if child is None:
            raise AttributeError(
                f"config folder {str(self._tprd_dir)!r} has no config file or folder {attr!r}"
            )
        setattr(self, attr, child)
        return child


class _Loader:
    """Executes config files; one instance per top-level ``LazyConfig.load`` call."""

    def __init__(self) -> None:
        self.stack: List[Path] = []

    # -- file execution ------------------------------------------------------------------
    def exec_file(self, path: Path) -> Dict[str, Any]:
        path = path.resolve()
        if path in self.stack:
            chain = " -> ".join(str(p) for p in self.stack + [path])
            raise ImportError(f"Circular import between config files: {chain}")
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigLoadError(f"Cannot read config file {str(path)!r}: {e}", str(path)) from e
        try:
            code = compile(source, str(path), "exec", dont_inherit=True)
        except SyntaxError as e:
            line = (e.text or "").rstrip()
            raise ConfigLoadError(
                f"Syntax error in config file {e.filename or str(path)}:{e.lineno}: {e.msg}"
                + (f"\n    {line.strip()}" if line else ""),
                e.filename or str(path),
                e.lineno,
            ) from e

        module_name = f"{_LOADER_PACKAGE}.c{next(_counter)}_{_safe_ident(path.stem)}"
        namespace: Dict[str, Any] = {
            "__name__": module_name,
            "__file__": str(path),
            "__package__": module_name.rsplit(".", 1)[0],
            "__builtins__": self._builtins(),
        }
        self.stack.append(path)
        try:
            exec(code, namespace)
        except ConfigLoadError as e:
            # An imported config failed: keep its message (it names that file) and add where
            # this file imported it.
            where = _innermost_frame_in(e.__traceback__, str(path))
            if where is not None:
                msg = f"{e}\n  imported from {where[0]}:{where[1]}"
                raise ConfigLoadError(msg, e.filename, e.lineno) from e.__cause__ or e
            raise
        except Exception as e:
            raise _load_error(path, e) from e
        finally:
            self.stack.pop()
        return namespace

    def _builtins(self) -> Dict[str, Any]:
        table = dict(builtins.__dict__)
        table["__import__"] = self._import
        return table

    # -- imports -------------------------------------------------------------------------
    def _import(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            try:
                return builtins.__import__(name, globals, locals, fromlist, level)
            except ModuleNotFoundError as e:
                top = name.split(".")[0]
                if top in ("detectron2", "detrex") and (e.name or "").split(".")[0] == top:
                    raise ModuleNotFoundError(
                        f"{e}. TPRD configs do not need {top}: write "
                        "`from tprd.config import LazyCall as L` (and `get_config`, `instantiate` "
                        "from tprd.config) instead.",
                        name=e.name,
                    ) from e
                raise
        current = (globals or {}).get("__file__")
        if not current:
            raise ImportError("relative import inside a config requires the importing file's path")
        base = Path(current).parent
        for _ in range(level - 1):
            base = base.parent
        if name:
            parts = name.split(".")
            dotted = "." * level + name
            module = self._load_path(base.joinpath(*parts), dotted, current)
        else:
            dotted = "." * level
            if not base.is_dir():
                raise ImportError(f"{dotted!r} in {current}: folder {str(base)!r} does not exist")
            module = _ConfigDirModule(f"{_LOADER_PACKAGE}.dir", base, self)
        for item in fromlist or ():
            if item == "*":
                continue
            if isinstance(module, _ConfigDirModule):
                child = self.resolve_child(module._tprd_dir, item)
                if child is None:
                    raise ImportError(
                        f"cannot import name {item!r} from {dotted!r} in {current}: no config "
                        f"file {item}.py or folder {item}/ in {str(module._tprd_dir)!r}"
                    )
                setattr(module, item, child)
                continue
            if item not in module.__dict__:
                defined = sorted(k for k in module.__dict__ if not k.startswith("_"))
                close = difflib.get_close_matches(item, defined, n=3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ImportError(
                    f"cannot import name {item!r} from config file {module.__file__} "
                    f"(imported as {dotted!r} in {current}).{hint}"
                )
            module.__dict__[item] = _as_config(module.__dict__[item])
        return module

    def _load_path(self, target: Path, dotted: str, current: str) -> types.ModuleType:
        py_file = target.with_name(target.name + ".py")
        if py_file.is_file():
            return self.load_module(py_file)
        if target.is_dir():
            return _ConfigDirModule(f"{_LOADER_PACKAGE}.dir", target, self)
        raise ImportError(
            f"cannot resolve relative import {dotted!r} in {current}: neither {str(py_file)!r} "
            f"nor folder {str(target)!r} exists"
        )

    def resolve_child(self, directory: Path, name: str) -> Optional[Any]:
        py_file = directory / f"{name}.py"
        if py_file.is_file():
            return self.load_module(py_file)
        sub = directory / name
        if sub.is_dir():
            return _ConfigDirModule(f"{_LOADER_PACKAGE}.dir", sub, self)
        return None

    def load_module(self, path: Path) -> types.ModuleType:
        namespace = self.exec_file(path)
        module = types.ModuleType(namespace["__name__"])
        module.__dict__.update(namespace)
        # Like the loaded config itself, an imported file's dicts and lists are configs, whether
        # reached by ``from .x import name`` or as ``x.name`` after ``from . import x``.
        for name, value in namespace.items():
            if _is_config_value(name, value):
                module.__dict__[name] = _as_config(value)
        return module


def _safe_ident(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text) or "cfg"


def _innermost_frame_in(tb, filename: str) -> Optional[Tuple[str, int]]:
    found = None
    for frame in traceback.extract_tb(tb):
        if frame.filename == filename:
            found = (frame.filename, frame.lineno)
    return found


def _load_error(path: Path, exc: BaseException) -> ConfigLoadError:
    frames = traceback.extract_tb(exc.__traceback__)
    cfg_frame = None
    for frame in frames:
        if frame.filename == str(path):
            cfg_frame = frame
    where_file = cfg_frame.filename if cfg_frame else str(path)
    where_line = cfg_frame.lineno if cfg_frame else None
    msg = f"Failed to load config file {where_file}"
    if where_line is not None:
        msg += f":{where_line}"
    msg += f": {type(exc).__name__}: {exc}"
    if cfg_frame is not None and cfg_frame.line:
        msg += f"\n    {cfg_frame.line.strip()}"
    if (
        frames
        and cfg_frame is not None
        and frames[-1] is not cfg_frame
        and not frames[-1].filename.startswith(_PACKAGE_DIR)
    ):
        inner = frames[-1]
        msg += f"\n  raised in {inner.filename}:{inner.lineno}"
    return ConfigLoadError(msg, where_file, where_line)


def _namespace_to_config(namespace: Dict[str, Any], path: Path) -> DictConfig:
    ret: Dict[str, Any] = {}
    for name, value in namespace.items():
        if not _is_config_value(name, value):
            continue
        try:
            ret[name] = _as_config(value)
        except Exception as e:
            raise ConfigLoadError(
                f"Failed to load config file {path}: top-level variable {name!r} cannot be "
                f"stored in a config: {type(e).__name__}: {e}",
                str(path),
            ) from e
    return DictConfig(content=ret, flags=dict(_FLAGS))


def _select_keys(cfg: DictConfig, keys: Union[None, str, Sequence[str]], path: Path) -> Any:
    if keys is None:
        return cfg

    def one(key: str) -> Any:
        if key not in cfg.keys():
            available = ", ".join(str(k) for k in cfg.keys()) or "(none)"
            raise KeyError(f"Config file {path} defines no top-level {key!r}; it defines: {available}")
        return cfg[key]

    if isinstance(keys, str):
        return one(keys)
    return tuple(one(k) for k in keys)


# --------------------------------------------------------------------------------------------
# Normalising for YAML (dotted names for callables, placeholders for the rest)
# --------------------------------------------------------------------------------------------
def _code_location(obj: Any) -> str:
    code = getattr(obj, "__code__", None)
    if code is not None:
        return f"{code.co_filename}:{code.co_firstlineno}"
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (TypeError, OSError):
        return "unknown location"


def _callable_placeholder(obj: Any) -> str:
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qualname and "<lambda>" in qualname:
        return f"<lambda at {_code_location(obj)}>"
    if qualname and "<locals>" in qualname:
        return f"<local function {qualname} at {_code_location(obj)}>"
    if qualname and (inspect.isfunction(obj) or inspect.isclass(obj)):
        return f"<not importable: {qualname} at {_code_location(obj)}>"
    return f"<unserializable: {_short_repr(obj)}>"


def _short_repr(obj: Any, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:  # pragma: no cover - broken __repr__
        text = f"{type(obj).__name__} object"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _normalize(value: Any, path: str, problems: Optional[List[Tuple[str, str]]]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, enum.Enum):
            return _normalize_enum(value, path, problems)
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, abc.Mapping):
        return {k: _normalize(v, _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v, _join(path, i), problems) for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _normalize_enum(value, path, problems)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if inspect.isclass(value) or callable(value) and hasattr(value, "__qualname__"):
        name = dotted_name(value)
        if name is not None:
            return name
        text = _callable_placeholder(value)
    else:
        text = f"<unserializable: {_short_repr(value)}>"
    if problems is not None:
        problems.append((path or "<root>", text))
    return text


def _normalize_enum(value: enum.Enum, path: str, problems) -> str:
    cls_name = dotted_name(type(value))
    if cls_name is not None:
        return f"{cls_name}.{value.name}"
    text = f"<unserializable: {_short_repr(value)}>"
    if problems is not None:
        problems.append((path or "<root>", text))
    return text


def _join(path: str, key: Any) -> str:
    return str(key) if path == "" else f"{path}.{key}"


def normalize_config(cfg: Any) -> Any:
    """Plain-Python view of ``cfg`` exactly as :meth:`LazyConfig.save` writes it.

    Callables become dotted import paths, unserialisable values become placeholder strings and
    interpolations stay unresolved. ``normalize_config(LazyConfig.load(saved)) ==
    normalize_config(cfg)`` is the round-trip guarantee of ``save``/``load``.
    """
    return _normalize(cfg, "", None)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------
_WORD_LITERALS = {"true": True, "false": False, "null": None}


def _parse_value(text: str) -> Any:
    stripped = text.strip()
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if stripped in _WORD_LITERALS:
        return _WORD_LITERALS[stripped]
    return text


def _is_quoted(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\""


def _type_error(current: Any, value: Any, value_text: str) -> Optional[str]:
    """Why ``value`` (parsed from ``value_text``) cannot replace ``current``, or None when it can.

    Checked: a number (int or float accepted; an int key also takes a float such as ``1e4``), a
    bool and a list (or tuple; a list of strings also takes one string). Free: strings, ``None`` either way, mappings and objects,
    interpolations (``${...}``) and values the user quoted deliberately (``'12'``).
    """
    if value is None or current is None or _is_quoted(value_text):
        return None
    if isinstance(value, str) and value.strip().startswith("${"):
        return None
    if isinstance(current, bool):
        return None if isinstance(value, bool) else "a bool (True or False)"
    if isinstance(current, int):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "an int"
    if isinstance(current, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number (float)"
    if isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return None
        if isinstance(value, str) and current and all(isinstance(v, str) for v in current):
            return None  # one name where the config lists names (dataset.names=voc_2007_test)
        return "a list, e.g. [1, 2]"
    return None


def _iter_paths(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Yield ``(dotted_path, value)`` for every node of a plain container, parents first."""
    if isinstance(node, abc.Mapping):
        for k, v in node.items():
            p = _join(prefix, k)
            yield p, v
            yield from _iter_paths(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            p = _join(prefix, i)
            yield p, v
            yield from _iter_paths(v, p)


def _lookup(plain: Any, parts: List[str]) -> Tuple[bool, Any]:
    node = plain
    for part in parts:
        if isinstance(node, abc.Mapping):
            if part in node:
                node = node[part]
                continue
            # omegaconf allows int keys; the command line always gives strings.
            if part.lstrip("-").isdigit() and int(part) in node:
                node = node[int(part)]
                continue
            return False, None
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            return False, None
        return False, None
    return True, node


# --------------------------------------------------------------------------------------------
# LazyConfig
# --------------------------------------------------------------------------------------------
class LazyConfig:
    """Load, override, save and print lazy configs (all static methods)."""

    @staticmethod
    def load(filename: Union[str, os.PathLike], keys: Union[None, str, Sequence[str]] = None):
        """Load a ``.py`` or ``.yaml`` config file into a ``DictConfig``.

        ``keys``: return only this top-level key (a string) or a tuple of them (a sequence).
        """
        path = Path(filename).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist")
        path = path.resolve()
        suffix = path.suffix.lower()
        if suffix == ".py":
            namespace = _Loader().exec_file(path)
            cfg = _namespace_to_config(namespace, path)
        elif suffix in (".yaml", ".yml"):
            cfg = LazyConfig._load_yaml(path)
        else:
            raise ValueError(f"Unsupported config file type {path.suffix!r} for {str(path)!r}: use .py or .yaml")
        return _select_keys(cfg, keys, path)

    @staticmethod
    def _load_yaml(path: Path) -> DictConfig:
        try:
            raw = OmegaConf.load(path)
        except Exception as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigLoadError(
                f"Failed to load config file {path}{line}: {type(e).__name__}: {e}",
                str(path),
                mark.line + 1 if mark is not None else None,
            ) from e
        if not isinstance(raw, DictConfig):
            raise ConfigLoadError(f"Config file {path} must hold a mapping at top level, got a list", str(path))
        return DictConfig(content=OmegaConf.to_container(raw, resolve=False), flags=dict(_FLAGS))

    # -- overrides -----------------------------------------------------------------------
    @staticmethod
    def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """Apply ``key=value`` overrides in place and return ``cfg``.

        Values are Python literals (``ast.literal_eval``: ``1``, ``1e-4``, ``[1, 2]``, ``None``,
        ``True``, ``'a b'``); ``true``/``false``/``null`` are accepted too; anything else is kept
        as a string. The key must already exist; ``+key=value`` adds a new key under an existing
        mapping. Where the config holds a number, a bool or a list, the value must be one too
        (``train.max_iter=abc`` is a :class:`ConfigOverrideError`: ``expected an int (current value
        600)``), so a wrong value fails here, before anything is built; strings, ``None``, quoted
        values and ``+key=`` additions are free.
        """
        if isinstance(overrides, str):
            overrides = [overrides]
        for item in overrides:
            LazyConfig._apply_one(cfg, item)
        return cfg

    @staticmethod
    def _apply_one(cfg: DictConfig, item: str) -> None:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigOverrideError(f"Override {item!r} must look like key=value (e.g. train.max_iter=100)")
        key, value_text = item.split("=", 1)
        key = key.strip()
        add = key.startswith("+")
        if add:
            key = key[1:].strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigOverrideError(f"Override {item!r} has a malformed key {key!r}")
        value = _parse_value(value_text)
        parts = key.split(".")
        plain = OmegaConf.to_container(cfg, resolve=False)
        exists, current = _lookup(plain, parts)
        expected = _type_error(current, value, value_text) if exists else None
        if expected:
            raise ConfigOverrideError(
                f"{key}={value_text}: expected {expected} (current value {current!r})"
            )
        if not exists:
            parent_exists, parent = _lookup(plain, parts[:-1])
            if add:
                if not parent_exists or not isinstance(parent, abc.Mapping):
                    parent_key = ".".join(parts[:-1]) or "<root>"
                    raise ConfigOverrideError(
                        f"Override {item!r}: cannot add {key!r} because its parent {parent_key!r} "
                        "is not an existing mapping in the config."
                    )
            else:
                all_keys = [p for p, _ in _iter_paths(plain)]
                close = difflib.get_close_matches(key, all_keys, n=3, cutoff=0.6)
                if not close:
                    last = parts[-1]
                    close = [p for p in all_keys if p.rsplit(".", 1)[-1] == last][:3]
                msg = f"Override {item!r}: key {key!r} does not exist in the config."
                if close:
                    msg += f" Did you mean: {', '.join(close)}?"
                if parent_exists and isinstance(parent, abc.Mapping):
                    msg += f" To add a new key, write '+{key}={value_text}'."
                raise ConfigOverrideError(msg)
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=add)
        except Exception as e:
            raise ConfigOverrideError(f"Override {item!r} failed: {type(e).__name__}: {e}") from e

    # -- saving / printing ----------------------------------------------------------------
    @staticmethod
    def to_yaml(cfg: Any) -> str:
        """The YAML text that :meth:`save` writes (warns about unserialisable values)."""
        problems: List[Tuple[str, str]] = []
        plain = _normalize(cfg, "", problems)
        if problems:
            listing = "\n".join(f"  {p}: {t}" for p, t in problems)
            logger.warning(
                "Config values that cannot be saved as YAML were replaced by placeholders "
                "(the saved config cannot rebuild them):\n%s",
                listing,
            )
        return OmegaConf.to_yaml(OmegaConf.create(plain))

    @staticmethod
    def save(cfg: Any, filename: Union[str, os.PathLike]) -> None:
        """Write ``cfg`` as YAML that :meth:`load` reads back.

        Callables are written as their dotted import path; lambdas, local functions and other
        values without a YAML form are written as ``"<...>"`` placeholder strings with a warning.
        """
        text = LazyConfig.to_yaml(cfg)
        path = Path(filename)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    @staticmethod
    def pformat(cfg: Any) -> str:
        """A readable dump of ``cfg`` (YAML, callables as dotted paths), without warnings."""
        plain = _normalize(cfg, "", None)
        if not isinstance(plain, (dict, list)):
            return repr(plain)
        try:
            return OmegaConf.to_yaml(OmegaConf.create(plain))
        except Exception:  # e.g. a plain dict holding a string omegaconf cannot parse
            return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, width=100)

    @staticmethod
    def to_py(cfg: Any, prefix: str = "") -> str:
        """Python source that rebuilds ``cfg`` with ``LazyCall`` (callables by import path).

        Unserialisable values appear as placeholder strings, as in :meth:`save`.
        """
        plain = _normalize(cfg, "", None)
        imports: Dict[str, str] = {}

        def target_expr(target: Any) -> str:
            if isinstance(target, str) and not target.startswith("<"):
                mod, _, attr = target.rpartition(".")
                try:
                    obj = locate(target)
                except ImportError:
                    obj = None
                if mod and obj is not None and "." not in attr and attr.isidentifier():
                    # Import the top-level attribute of the deepest module in the path.
                    owner = locate(mod)
                    if inspect.ismodule(owner):
                        alias = attr if imports.get(attr, target) == target else _safe_ident(target)
                        imports[alias] = target
                        return alias
            return repr(target)

        def render(value: Any, indent: int) -> str:
            pad = "    " * (indent + 1)
            end = "    " * indent
            if isinstance(value, dict):
                if TARGET_KEY in value:
                    args = [f"{pad}{k}={render(v, indent + 1)}," for k, v in value.items() if k != TARGET_KEY]
                    head = f"L({target_expr(value[TARGET_KEY])})("
                    if all(isinstance(k, str) and k.isidentifier() for k in value if k != TARGET_KEY):
                        if not args:
                            return head + ")"
                        return head + "\n" + "\n".join(args) + f"\n{end})"
                    # Non-identifier keys: fall back to an explicit dict.
                if not value:
                    return "{}"
                items = [f"{pad}{k!r}: {render(v, indent + 1)}," for k, v in value.items()]
                return "{\n" + "\n".join(items) + f"\n{end}}}"
            if isinstance(value, list):
                if not value:
                    return "[]"
                items = [f"{pad}{render(v, indent + 1)}," for v in value]
                return "[\n" + "\n".join(items) + f"\n{end}]"
            return repr(value)

        body: List[str] = []
        if isinstance(plain, dict):
            for k, v in plain.items():
                body.append(f"{prefix}{k} = {render(v, 0)}")
        else:
            body.append(f"{prefix}cfg = {render(plain, 0)}")
        lines = ["from tprd.config import LazyCall as L"]
        for alias, target in sorted(imports.items()):
            mod, _, attr = target.rpartition(".")
            lines.append(f"from {mod} import {attr}" + (f" as {alias}" if alias != attr else ""))
        return "\n".join(lines) + "\n\n" + "\n\n".join(body) + "\n"


# --------------------------------------------------------------------------------------------
# Repository configs
# --------------------------------------------------------------------------------------------
def config_root() -> Path:
    """The repository's ``configs/`` folder (found from the installed package location)."""
    import tprd

    return Path(tprd.__file__).resolve().parents[1] / "configs"


def get_config(config_path: str, keys: Union[None, str, Sequence[str]] = None):
    """Load ``configs/<config_path>`` from the repository, e.g. ``get_config("common/train.py")``."""
    root = config_root()
    path = root / config_path
    if path.is_file():
        return LazyConfig.load(path, keys)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Config {config_path!r} not found: the configs folder {str(root)!r} does not exist "
            "(get_config needs the repository checkout, installed with `pip install -e .`)."
        )
    near = path.parent
    while not near.is_dir() and near != root and root in near.parents:
        near = near.parent
    if not near.is_dir():
        near = root
    entries = sorted(
        (p.name + ("/" if p.is_dir() else ""))
        for p in near.iterdir()
        if not p.name.startswith((".", "__")) and (p.is_dir() or p.suffix in (".py", ".yaml", ".yml"))
    )
    rel = near.relative_to(root).as_posix() if near != root else "."
    listing = ", ".join(entries) if entries else "(empty)"
    close = difflib.get_close_matches(path.name, [e.rstrip("/") for e in entries], n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"Config {config_path!r} not found under {str(root)!r}.{hint} Available in {rel}/: {listing}"
    )
