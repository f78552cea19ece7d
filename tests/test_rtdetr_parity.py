"""RT-DETRv2 against the reference's parity fixtures (tests/fixtures/reference/rtdetr_parity/).

The fixtures are the official ``rtdetrv2_r18vd_120e_coco`` model reduced to 20 queries / 5 classes,
filled with the ``crc32-randn-v1`` rule, in eval and in training mode (docs/rt_detr.md#parity).
Each fixture is run from a copy holding only the four input files (``config.json``, ``keys.json``,
``fill_checksums.json``, ``input.pt``), so nothing can peek at the expected outputs, and the result is
compared with ``outputs.pt``, ``intermediates.pt``, ``losses.json`` and ``grad_checksums.json`` at the
tolerances of the fixtures' README.
"""
import importlib.util
import shutil

import pytest
import torch

from conftest import REFERENCE_DIR, REPO

RTDETR_PARITY_DIR = REFERENCE_DIR / "rtdetr_parity"
INPUT_FILES = ("config.json", "keys.json", "fill_checksums.json", "input.pt")
FIXTURES = ["rtdetrv2_r18vd", "rtdetrv2_r18vd_train"]


def _inputs_only(name, tmp_path):
    src = RTDETR_PARITY_DIR / name
    if not src.is_dir():
        pytest.fail(f"{src} not found (set TPRD_REFERENCE_DIR)")
    dst = tmp_path / name
    dst.mkdir()
    for f in INPUT_FILES:
        shutil.copy(src / f, dst / f)
    return src, dst


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tprd.testing.rtdetr_parity import run_rtdetr_fixture

    out = {}
    for name in FIXTURES:
        src, dst = _inputs_only(name, tmp_path_factory.mktemp("rtdetr"))
        out[name] = (src, run_rtdetr_fixture(dst))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_fill_and_strict_load(results, name):
    _, result = results[name]
    assert result.ok, result.report()


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference(results, name):
    from tprd.testing.rtdetr_parity import compare_rtdetr_fixture

    src, result = results[name]
    checks = compare_rtdetr_fixture(result, src)
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    quantities = {c.quantity.split("[")[0].split(".")[0] for c in checks}
    assert {"all_layers_pred_logits", "enc_outputs", "intermediates"} <= quantities
    if result.mode == "train":
        assert any(c.quantity.startswith("grads per key") for c in checks)
        assert any(c.quantity.startswith("matches.final") for c in checks)


def test_train_loss_names_and_order(results):
    import json

    src, result = results["rtdetrv2_r18vd_train"]
    ref = json.loads((src / "losses.json").read_text())
    assert list(result.dump["losses"]) == list(ref["losses"])
    assert result.dump["matcher_call_order"] == ["final", "aux_0", "aux_1", "enc_0"]


def _tool():
    spec = importlib.util.spec_from_file_location("detrex_parity", REPO / "tools" / "detrex_parity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_tool_dumps_the_outputs_layout(tmp_path):
    """``tools/detrex_parity.py DIR --dump OUT`` on an RT-DETR eval fixture reduced to its inputs:
    exits 0 and writes the keys of ``outputs.pt``, values within tolerance."""
    src, dst = _inputs_only("rtdetrv2_r18vd", tmp_path)
    out = tmp_path / "ours.pt"
    assert _tool().main([str(dst), "--dump", str(out)]) == 0
    dump = torch.load(out, weights_only=False)
    ref = torch.load(src / "outputs.pt", weights_only=True)
    assert set(dump) == set(ref)
    for key in ("pred_logits", "pred_boxes", "all_layers_pred_logits", "all_layers_pred_boxes"):
        torch.testing.assert_close(dump[key], ref[key], atol=1e-4, rtol=1e-4)
    assert torch.equal(dump["enc_topk_indices"], ref["enc_topk_indices"])
    assert torch.equal(dump["detections"][0]["labels"].sort().values, ref["detections"][0]["labels"].sort().values)
