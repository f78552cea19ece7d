"""Tests for tprd.config: LazyCall, LazyConfig (load / overrides / save), instantiate, get_config."""
import fractions
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, ListConfig

import tprd
from tprd.config import (
    ConfigLoadError,
    ConfigOverrideError,
    InstantiationError,
    L,
    LazyCall,
    LazyConfig,
    config_root,
    dotted_name,
    get_config,
    instantiate,
    locate,
    normalize_config,
)
from tprd.config import lazy as lazy_module


# ---------------------------------------------------------------------------------------------
# helpers: importable classes used as targets
# ---------------------------------------------------------------------------------------------
class Inner:
    def __init__(self, dim=4, scale=1.0):
        self.dim = dim
        self.scale = scale


class Outer:
    def __init__(self, inner, layers=(), extra=None, num_classes=0):
        self.inner = inner
        self.layers = layers
        self.extra = extra
        self.num_classes = num_classes


class Exploding:
    def __init__(self, value):
        raise ValueError(f"bad value {value}")


def make_pair(a, b=2):
    return (a, b)


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# LazyCall
# ---------------------------------------------------------------------------------------------
def test_lazycall_builds_config_without_calling():
    calls = []

    def target(**kw):
        calls.append(kw)
        return kw

    cfg = L(target)(a=1, b=L(Inner)(dim=3))
    assert isinstance(cfg, DictConfig)
    assert cfg._target_ is target  # the callable object itself is kept
    assert cfg.a == 1
    assert isinstance(cfg.b, DictConfig) and cfg.b._target_ is Inner and cfg.b.dim == 3
    assert calls == []  # nothing was called
    assert LazyCall is L


def test_lazycall_rejects_positional_and_non_callables():
    with pytest.raises(TypeError, match="keyword"):
        L(Inner)(3)
    with pytest.raises(TypeError):
        L(42)


def test_lazycall_config_is_editable():
    cfg = L(Inner)(dim=3)
    cfg.dim = 7
    cfg.scale = 0.5
    obj = instantiate(cfg)
    assert (obj.dim, obj.scale) == (7, 0.5)


# ---------------------------------------------------------------------------------------------
# instantiate
# ---------------------------------------------------------------------------------------------
def test_instantiate_nested_lists_and_dicts():
    tensor = torch.arange(3)
    cfg = L(Outer)(
        inner=L(Inner)(dim=8, scale=2.0),
        layers=[L(Inner)(dim=1), L(Inner)(dim=2), 5],
        extra={"sub": L(Inner)(dim=9), "plain": [1, 2], "t": tensor},
    )
    obj = instantiate(cfg)
    assert isinstance(obj, Outer)
    assert isinstance(obj.inner, Inner) and obj.inner.dim == 8 and obj.inner.scale == 2.0
    assert isinstance(obj.layers, list)
    assert [type(x) for x in obj.layers] == [Inner, Inner, int]
    assert [obj.layers[0].dim, obj.layers[1].dim, obj.layers[2]] == [1, 2, 5]
    assert type(obj.extra) is dict
    assert isinstance(obj.extra["sub"], Inner) and obj.extra["sub"].dim == 9
    assert obj.extra["plain"] == [1, 2] and type(obj.extra["plain"]) is list
    assert obj.extra["t"] is tensor  # non-config objects are passed through untouched


def test_instantiate_passes_objects_and_non_configs_through():
    module = torch.nn.Linear(2, 2)
    cfg = L(Outer)(inner=module)
    assert instantiate(cfg).inner is module
    assert instantiate(module) is module
    assert instantiate(5) == 5
    assert instantiate([L(Inner)(dim=2)])[0].dim == 2
    assert instantiate({"a": L(Inner)(dim=6)})["a"].dim == 6


def test_instantiate_list_config_and_dict_without_target():
    lst = ListConfig([L(Inner)(dim=1), {"x": L(Inner)(dim=2)}], flags={"allow_objects": True})
    out = instantiate(lst)
    assert type(out) is list and out[0].dim == 1 and type(out[1]) is dict and out[1]["x"].dim == 2


def test_instantiate_dotted_path_targets():
    cfg = DictConfig({"_target_": "fractions.Fraction", "numerator": 3, "denominator": 4})
    assert instantiate(cfg) == fractions.Fraction(3, 4)
    # module.Class.method paths
    method_cfg = {"_target_": "fractions.Fraction.from_float", "f": 0.5}
    assert instantiate(method_cfg) == fractions.Fraction(1, 2)
    nested = {"_target_": f"{__name__}.make_pair", "a": {"_target_": "fractions.Fraction", "numerator": 1}}
    assert instantiate(nested) == (fractions.Fraction(1), 2)


def test_locate_and_dotted_name():
    assert locate("torch.nn.Linear") is torch.nn.Linear
    assert locate("fractions.Fraction.from_float") == fractions.Fraction.from_float
    assert locate("dict") is dict
    assert dotted_name(torch.nn.Linear) == "torch.nn.modules.linear.Linear"
    assert locate(dotted_name(Inner)) is Inner
    assert dotted_name(lambda x: x) is None

    def local():
        pass

    assert dotted_name(local) is None
    with pytest.raises(ImportError, match="Linearr"):
        locate("torch.nn.Linearr")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        locate("no_such_module_xyz.Thing")


def test_instantiate_error_names_target_and_path():
    cfg = DictConfig(
        {"model": {"backbone": L(Exploding)(value=3), "other": 1}}, flags={"allow_objects": True}
    )
    with pytest.raises(InstantiationError) as info:
        instantiate(cfg)
    msg = str(info.value)
    assert "model.backbone" in msg
    assert "Exploding" in msg
    assert "bad value 3" in msg
    # Same full path when instantiating a sub-node of the config.
    with pytest.raises(InstantiationError, match=r"model\.backbone"):
        instantiate(cfg.model)


def test_instantiate_bad_dotted_target_names_path():
    cfg = DictConfig({"head": {"_target_": "fractions.NoSuchThing", "x": 1}})
    with pytest.raises(InstantiationError) as info:
        instantiate(cfg)
    assert "fractions.NoSuchThing" in str(info.value)
    assert "head" in str(info.value)


def test_interpolation_resolves_relative_keys():
    cfg = DictConfig(
        {
            "model": L(Outer)(
                inner=L(Inner)(dim="${..num_classes}"),
                num_classes=7,
            ),
            "width": 32,
            "head": L(Inner)(dim="${width}", scale="${..width}"),
        },
        flags={"allow_objects": True},
    )
    model = instantiate(cfg.model)  # sub-node: interpolation reaches its parent
    assert model.inner.dim == 7 and model.num_classes == 7
    cfg.model.num_classes = 11
    assert instantiate(cfg).get("model").inner.dim == 11
    head = instantiate(cfg.head)
    assert head.dim == 32 and head.scale == 32


def test_missing_mandatory_value_fails_with_key():
    cfg = DictConfig({"train": {"init_checkpoint": "???"}, "m": L(Inner)(dim="${train.init_checkpoint}")},
                     flags={"allow_objects": True})
    with pytest.raises(InstantiationError, match="init_checkpoint"):
        instantiate(cfg.m)


# ---------------------------------------------------------------------------------------------
# Loading Python configs
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cfg_tree(tmp_path):
    """A package-less config tree like configs/ (no __init__.py anywhere)."""
    root = tmp_path / "configs"
    write(root, "common/train.py", """
        train = dict(max_iter=100, output_dir="./out", amp=dict(enabled=False), lr=1e-4)
        helper_value = 3
    """)
    write(root, "models/inner.py", f"""
        from tprd.config import LazyCall as L
        from {__name__} import Inner, Outer
        model = L(Outer)(inner=L(Inner)(dim=4), num_classes=80)
    """)
    write(root, "exp/a.py", """
        import math
        from ..common.train import train, helper_value
        from ..models.inner import model
        train.max_iter = 5
        model.num_classes = helper_value + int(math.sqrt(16))
        _private = dict(x=1)
        not_config = 3
    """)
    write(root, "exp/b.py", """
        from .a import train, model
        from .. import common
        from ..common import train as train_module
        model.inner.dim = 99
        extra = dict(lr=common.train.train.lr, same=train_module.train.max_iter)
    """)
    return root


def test_load_relative_imports_without_init_files(cfg_tree):
    assert not list(cfg_tree.rglob("__init__.py"))
    cfg = LazyConfig.load(cfg_tree / "exp/a.py")
    assert isinstance(cfg, DictConfig)
    assert set(cfg.keys()) == {"train", "model"}  # private names and scalars are not config
    assert cfg.train.max_iter == 5
    assert cfg.model.num_classes == 7  # helper_value (3) + sqrt(16): absolute import works
    assert cfg.model._target_ is Outer
    obj = instantiate(cfg.model)
    assert isinstance(obj, Outer) and obj.inner.dim == 4 and obj.num_classes == 7


def test_load_chain_of_relative_imports_and_folder_import(cfg_tree):
    cfg = LazyConfig.load(str(cfg_tree / "exp/b.py"))
    assert cfg.train.max_iter == 5  # a.py's change is visible through the chain
    assert cfg.model.inner.dim == 99
    assert cfg.extra.lr == 1e-4
    assert cfg.extra.same == 100  # a fresh copy of common/train.py, untouched by a.py


def test_loaded_configs_are_independent_copies(cfg_tree):
    a1 = LazyConfig.load(cfg_tree / "exp/a.py")
    a2 = LazyConfig.load(cfg_tree / "exp/a.py")
    base = LazyConfig.load(cfg_tree / "common/train.py")
    assert base.train.max_iter == 100  # a.py's edit did not leak into the imported file
    a1.train.max_iter = 1234
    a1.model.inner.dim = 555
    assert a2.train.max_iter == 5
    assert a2.model.inner.dim == 4
    assert LazyConfig.load(cfg_tree / "common/train.py").train.max_iter == 100


def test_load_keys(cfg_tree):
    train = LazyConfig.load(cfg_tree / "exp/a.py", keys="train")
    assert train.max_iter == 5
    train, model = LazyConfig.load(cfg_tree / "exp/a.py", keys=("train", "model"))
    assert model.num_classes == 7
    with pytest.raises(KeyError, match="nonexistent"):
        LazyConfig.load(cfg_tree / "exp/a.py", keys="nonexistent")


def test_load_does_not_instantiate(tmp_path):
    marker = tmp_path / "built.txt"
    path = write(tmp_path, "c.py", f"""
        from tprd.config import LazyCall as L
        model = L(open)(file={str(marker)!r}, mode="w")
    """)
    cfg = LazyConfig.load(path)
    assert cfg.model._target_ is open
    assert not marker.exists()


def test_load_missing_file_and_bad_relative_import(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        LazyConfig.load(tmp_path / "nope.py")
    path = write(tmp_path, "x/c.py", """
        from ..missing_dir.thing import model
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    assert "missing_dir" in str(info.value) and str(path) in str(info.value)


def test_load_error_names_file_and_line_for_syntax_error(tmp_path):
    path = write(tmp_path, "bad.py", """
        train = dict(
            max_iter=1,
        x = (
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    assert str(path) in str(info.value)
    assert info.value.filename == str(path)
    assert isinstance(info.value.lineno, int) and info.value.lineno >= 2


def test_load_error_names_file_and_line_for_runtime_error(tmp_path):
    path = write(tmp_path, "bad_runtime.py", """
        a = dict(x=1)
        b = dict(y=2)
        c = undefined_name + 1
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    msg = str(info.value)
    # textwrap.dedent keeps the leading newline, so `c = ...` is on line 4.
    assert f"{path}:4" in msg
    assert "undefined_name" in msg and "NameError" in msg
    assert isinstance(info.value.__cause__, NameError)


def test_load_error_in_imported_config_names_that_file(tmp_path):
    inner = write(tmp_path, "common/broken.py", """
        train = dict(x=1)
        raise RuntimeError("boom in broken")
    """)
    outer = write(tmp_path, "exp/top.py", """
        x = dict(a=1)
        from ..common.broken import train
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(outer)
    msg = str(info.value)
    assert f"{inner}:3" in msg and "boom in broken" in msg
    assert f"{outer}:3" in msg  # where it was imported from


def test_load_error_for_lazycall_misuse_points_at_config_line(tmp_path):
    path = write(tmp_path, "c.py", f"""
        from tprd.config import LazyCall as L
        from {__name__} import Inner
        model = L(Inner)(4)
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    assert f"{path}:4" in str(info.value)


def test_import_of_unknown_name_suggests(cfg_tree, tmp_path):
    path = write(cfg_tree, "exp/c.py", """
        from ..common.train import trian
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    assert "trian" in str(info.value) and "train" in str(info.value)


def test_circular_import_is_reported(tmp_path):
    write(tmp_path, "a.py", "from .b import y\nx = dict(v=1)\n")
    write(tmp_path, "b.py", "from .a import x\ny = dict(v=2)\n")
    with pytest.raises(ConfigLoadError, match="[Cc]ircular"):
        LazyConfig.load(tmp_path / "a.py")


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def override_cfg():
    return DictConfig(
        {
            "train": {"max_iter": 10, "lr": 0.1, "output_dir": "./out", "amp": {"enabled": False},
                      "init_checkpoint": "x.pth", "milestones": [1, 2]},
            "model": L(Outer)(inner=L(Inner)(dim=4), layers=[L(Inner)(dim=1)], num_classes=80),
        },
        flags={"allow_objects": True},
    )


def test_overrides_parse_python_literals(override_cfg):
    out = LazyConfig.apply_overrides(
        override_cfg,
        [
            "train.max_iter=123",
            "train.lr=2.5e-4",
            "train.output_dir=/tmp/x y",
            "train.amp.enabled=True",
            "train.init_checkpoint=None",
            "train.milestones=[3, 4]",
            "model.num_classes=20",
            "model.inner.dim='12'",
            "model.layers.0.dim=5",
        ],
    )
    assert out is override_cfg
    t = override_cfg.train
    assert t.max_iter == 123 and type(t.max_iter) is int
    assert t.lr == 2.5e-4 and type(t.lr) is float
    assert t.output_dir == "/tmp/x y"
    assert t.amp.enabled is True
    assert t.init_checkpoint is None
    assert list(t.milestones) == [3, 4]
    assert override_cfg.model.num_classes == 20
    assert override_cfg.model.inner.dim == "12"  # quoted -> string
    assert override_cfg.model.layers[0].dim == 5
    assert override_cfg.model._target_ is Outer  # untouched keys keep their objects
    model = instantiate(override_cfg.model)
    assert model.layers[0].dim == 5 and model.num_classes == 20


def test_overrides_plain_strings_and_lowercase_words(override_cfg):
    LazyConfig.apply_overrides(override_cfg, ["train.output_dir=hello", "train.amp.enabled=false"])
    assert override_cfg.train.output_dir == "hello"
    assert override_cfg.train.amp.enabled is False
    LazyConfig.apply_overrides(override_cfg, ["train.output_dir=a=b"])  # split on the first '='
    assert override_cfg.train.output_dir == "a=b"


def test_override_of_missing_key_names_key_and_suggestion(override_cfg):
    with pytest.raises(ConfigOverrideError) as info:
        LazyConfig.apply_overrides(override_cfg, ["train.max_iters=5"])
    msg = str(info.value)
    assert "train.max_iters" in msg
    assert "train.max_iter" in msg.replace("train.max_iters", "")
    with pytest.raises(KeyError, match="model.inner.dimm"):  # also a KeyError
        LazyConfig.apply_overrides(override_cfg, ["model.inner.dimm=5"])
    with pytest.raises(ConfigOverrideError) as info:
        LazyConfig.apply_overrides(override_cfg, ["model.num_clases=5"])
    assert "model.num_classes" in str(info.value)
    assert "max_iters" not in override_cfg.train


def test_override_plus_prefix_adds_new_leaf(override_cfg):
    LazyConfig.apply_overrides(override_cfg, ["+model.new_arg=3", "+train.amp.dtype=bf16"])
    assert override_cfg.model.new_arg == 3
    assert override_cfg.train.amp.dtype == "bf16"
    with pytest.raises(ConfigOverrideError, match="nothere"):
        LazyConfig.apply_overrides(override_cfg, ["+nothere.child=1"])


def test_override_syntax_errors(override_cfg):
    with pytest.raises(ConfigOverrideError, match="key=value"):
        LazyConfig.apply_overrides(override_cfg, ["train.max_iter"])
    with pytest.raises(ConfigOverrideError):
        LazyConfig.apply_overrides(override_cfg, ["train..max_iter=3"])


# ---------------------------------------------------------------------------------------------
# save / load round trip
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip(cfg_tree, tmp_path):
    cfg = LazyConfig.load(cfg_tree / "exp/b.py")
    cfg.model.layers = [L(Inner)(dim=2, scale=0.5), L("fractions.Fraction")(numerator=1)]
    cfg.model.inner.scale = "${..num_classes}"
    out = tmp_path / "out" / "config.yaml"
    LazyConfig.save(cfg, out)
    assert out.is_file()
    text = out.read_text()
    assert f"{__name__}.Outer" in text  # callables written as dotted import paths
    back = LazyConfig.load(out)
    assert normalize_config(back) == normalize_config(cfg)
    assert back.model._target_ == f"{__name__}.Outer"
    # the reloaded config builds the same objects
    a, b = instantiate(cfg.model), instantiate(back.model)
    assert type(a) is type(b) is Outer
    assert (a.inner.dim, a.inner.scale, a.num_classes) == (b.inner.dim, b.inner.scale, b.num_classes)
    assert a.inner.scale == 7
    assert [type(x) for x in b.layers] == [Inner, fractions.Fraction]


def test_normalize_config_turns_callables_into_paths():
    cfg = DictConfig({"m": L(torch.nn.Linear)(in_features=2, out_features=3), "act": torch.relu,
                      "p": Path("/a/b")}, flags={"allow_objects": True})
    plain = normalize_config(cfg)
    assert plain["m"]["_target_"] == "torch.nn.modules.linear.Linear"
    assert locate(plain["act"]) is torch.relu
    assert plain["p"] == "/a/b"


def test_save_lambda_and_objects_warns_and_writes_placeholder(tmp_path, caplog):
    def local_fn():
        return 1

    cfg = DictConfig(
        {"m": L(Inner)(dim=lambda: 3), "local": local_fn, "obj": object(), "ok": 1},
        flags={"allow_objects": True},
    )
    out = tmp_path / "c.yaml"
    with caplog.at_level(logging.WARNING, logger="tprd.config"):
        LazyConfig.save(cfg, out)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "m.dim" in warned and "local" in warned and "obj" in warned
    back = LazyConfig.load(out)
    assert back.ok == 1
    assert back.m.dim.startswith("<lambda at ") and "test_config.py" in back.m.dim
    assert "local_fn" in back.local and back.local.startswith("<")
    assert back.obj.startswith("<unserializable")
    assert back.m._target_ == f"{__name__}.Inner"


def test_placeholder_target_fails_clearly_on_instantiate(tmp_path, caplog):
    cfg = DictConfig({"m": L(lambda **kw: kw)(a=1)}, flags={"allow_objects": True})
    LazyConfig.save(cfg, tmp_path / "c.yaml")
    back = LazyConfig.load(tmp_path / "c.yaml")
    with pytest.raises(InstantiationError, match="placeholder"):
        instantiate(back)


def test_pformat_and_to_py_round_trip(cfg_tree, tmp_path):
    cfg = LazyConfig.load(cfg_tree / "exp/a.py")
    text = LazyConfig.pformat(cfg)
    assert "max_iter: 5" in text and f"{__name__}.Outer" in text
    source = LazyConfig.to_py(cfg)
    path = tmp_path / "regen.py"
    path.write_text(source)
    regen = LazyConfig.load(path)
    assert normalize_config(regen) == normalize_config(cfg)


def test_load_yaml_written_by_hand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  _target_: fractions.Fraction\n  numerator: ${..n}\n  n: 2\n")
    cfg = LazyConfig.load(path)
    cfg.model.pop("n")  # n is not an argument of Fraction
    cfg.model.numerator = 2
    assert instantiate(cfg.model) == fractions.Fraction(2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigLoadError, match="bad.yaml"):
        LazyConfig.load(bad)


# ---------------------------------------------------------------------------------------------
# get_config
# ---------------------------------------------------------------------------------------------
def test_config_root_is_repository_configs():
    assert config_root() == Path(tprd.__file__).resolve().parents[1] / "configs"


def test_get_config_loads_and_reports_missing(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    write(root, "common/train.py", "train = dict(max_iter=3)\n")
    write(root, "common/optim.py", "optimizer = dict(lr=1.0)\n")
    monkeypatch.setattr(lazy_module, "config_root", lambda: root)
    assert get_config("common/train.py").train.max_iter == 3
    assert get_config("common/train.py", keys="train").max_iter == 3
    with pytest.raises(FileNotFoundError) as info:
        get_config("common/trian.py")
    msg = str(info.value)
    assert "common/trian.py" in msg and "train.py" in msg and "optim.py" in msg
    with pytest.raises(FileNotFoundError) as info:
        get_config("nothere/deep/x.py")
    assert "common/" in str(info.value)


def test_get_config_on_real_repository_reports_missing_file():
    with pytest.raises(FileNotFoundError, match="definitely_not_a_config"):
        get_config("definitely_not_a_config_123.py")


def test_detectron2_import_in_config_gets_a_hint(tmp_path):
    try:
        import detectron2  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - detectron2 happens to be installed
        pytest.skip("detectron2 is installed")
    path = write(tmp_path, "c.py", """
        from detectron2.config import LazyCall as L
    """)
    with pytest.raises(ConfigLoadError) as info:
        LazyConfig.load(path)
    assert "from tprd.config import LazyCall as L" in str(info.value)
    assert f"{path}:2" in str(info.value)
