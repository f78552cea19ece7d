"""Every fixture under tests/fixtures/reference/parity (or $TPRD_PARITY_DIR) through the parity tool."""
import pytest

from conftest import PARITY_DIR
from tprd.checkpoint.detrex import ADAPTERS, adapter_for, adapter_for_config
from tprd.testing.parity import load_fixture, run_fixture

FIXTURES = sorted(p for p in PARITY_DIR.iterdir() if (p / "config.json").is_file()) if PARITY_DIR.is_dir() else []


def test_parity_fixtures_present():
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixture folder {PARITY_DIR} is absent (set TPRD_PARITY_DIR or TPRD_REFERENCE_DIR)")
    assert FIXTURES, f"no fixture folders (with config.json) under {PARITY_DIR}"


@pytest.mark.parametrize("fixture_dir", FIXTURES, ids=[p.name for p in FIXTURES])
def test_fixture_parity(fixture_dir):
    fixture = load_fixture(fixture_dir)
    adapter_for_config(fixture["config"]["reduced_config"])  # every fixture's detector has an adapter
    result = run_fixture(fixture_dir)
    assert result.has_reference, f"{fixture_dir.name} has no outputs.pt"
    assert result.ok, result.report()


def test_adapter_registry_is_keyed_by_the_detectors_family():
    for family, adapter in ADAPTERS.items():
        assert adapter.family == family == adapter.model_class.family
        assert adapter_for(adapter.model_class) is adapter
        for target in adapter.detrex_targets:
            assert adapter_for_config({"_target_": f"projects.x.modeling.{target}"}) is adapter
    with pytest.raises(ValueError, match="no tprd model for detrex target"):
        adapter_for_config({"_target_": "detrex.modeling.Unknown"})


@pytest.mark.parametrize("name", ["deformable_detr", "deformable_detr_train"])
def test_tool_runs_without_reference_and_dumps(tmp_path, name):
    """``tools/detrex_parity.py DIR --dump OUT`` on a fixture without outputs.pt: runs, exits 0, and the
    dump (outputs.pt layout) agrees with the reference we withheld."""
    import importlib.util
    import shutil

    import torch

    src = PARITY_DIR / name
    if not src.is_dir():
        pytest.fail(f"{src} not found (set TPRD_PARITY_DIR or TPRD_REFERENCE_DIR)")
    for f in ("config.json", "keys.json", "fill_checksums.json", "input.pt"):
        shutil.copy(src / f, tmp_path / f)
    from conftest import REPO

    spec = importlib.util.spec_from_file_location("detrex_parity", REPO / "tools" / "detrex_parity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "ours.pt"
    assert tool.main([str(tmp_path), "--dump", str(out)]) == 0
    dump = torch.load(out, weights_only=False)
    ref = torch.load(src / "outputs.pt", weights_only=False)
    assert torch.allclose(dump["all_layers_pred_logits"], ref["all_layers_pred_logits"], atol=1e-4, rtol=1e-4)
    assert torch.allclose(dump["pred_boxes"], ref["pred_boxes"], atol=1e-4, rtol=1e-4)
    if "losses" in ref:
        for k, v in ref["losses"].items():
            assert dump["losses"][k].item() == pytest.approx(float(v), abs=1e-4, rel=1e-4)
    else:
        assert torch.equal(dump["detections"][0]["labels"], ref["detections"][0]["labels"])
