"""The plain RT-DETRv2 configs build exactly the official models' state-dict keys and shapes
(tests/fixtures/reference/rtdetr_keys/), and a checkpoint nested either way loads strictly.

The four larger models are built on the ``meta`` device (shapes only, no memory); R18 is built on
the CPU and gets a full checkpoint made from its key list.
"""
import json

import pytest
import torch

from conftest import REPO, RTDETR_KEYS_DIR
from tprd.config import LazyConfig, instantiate

CONFIGS = ["rtdetrv2_r18vd_120e_coco", "rtdetrv2_r34vd_120e_coco", "rtdetrv2_r50vd_6x_coco",
           "rtdetrv2_r50vd_m_7x_coco", "rtdetrv2_r101vd_6x_coco"]


def _key_rows(name):
    path = RTDETR_KEYS_DIR / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"{path} not found (set TPRD_REFERENCE_DIR)")
    return json.loads(path.read_text())


def _build(name, device="meta"):
    cfg = LazyConfig.load(REPO / "projects" / "rt_detr" / "configs" / f"{name}.py")
    with torch.device(device):
        return instantiate(cfg.model)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_official_keys(name):
    from tprd.checkpoint.rtdetr import rtdetr_key_report

    model = _build(name)
    report = rtdetr_key_report(model, _key_rows(name))
    assert report.ok, report.summary()
    summary = json.loads((RTDETR_KEYS_DIR / "_summary.json").read_text())[name]
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == summary["num_params_unique"]
    assert sum(p.numel() for p in unique.values() if p.requires_grad) == summary["num_params_trainable"]
    assert model.decoder.eval_idx == summary["decoder_eval_idx"]
    assert model.decoder.num_layers == summary["decoder_num_layers"]


def _checkpoint_from_keys(rows):
    sd = {}
    for i, (key, shape, dtype) in enumerate(rows):
        dt = getattr(torch, dtype.replace("torch.", ""))
        sd[key] = torch.full(tuple(shape), (i % 7) / 7.0).to(dt)
    return sd


@pytest.mark.parametrize("nesting", ["ema", "model", "flat"])
def test_r18_checkpoint_loads_strictly(nesting):
    from tprd.checkpoint import load_rtdetr_checkpoint

    rows = _key_rows("rtdetrv2_r18vd_120e_coco")
    sd = _checkpoint_from_keys(rows)
    ckpt = {"ema": {"module": sd, "updates": 1}, "model": {}} if nesting == "ema" else (
        {"model": sd, "last_epoch": 3} if nesting == "model" else sd)
    model = _build("rtdetrv2_r18vd_120e_coco", device="cpu")
    report = load_rtdetr_checkpoint(model, ckpt, strict=True)
    assert report.ok and len(report.matched) == len(rows)
    own = model.state_dict()
    for key in ("decoder.enc_score_head.weight", "backbone.conv1.conv1_1.norm.running_var", "decoder.anchors"):
        assert torch.equal(own[key], sd[key])


def test_anchor_size_mismatch_is_explained_and_can_keep_the_models_anchors():
    from tprd.checkpoint import load_rtdetr_checkpoint
    from tprd.checkpoint import CheckpointMismatchError

    rows = _key_rows("rtdetrv2_r18vd_120e_coco")
    sd = _checkpoint_from_keys(rows)
    for key in [k for k in sd if k.endswith("num_points_scale")]:
        sd[key] = torch.full((12,), 0.25)  # the real constant: checked under constant_buffers="model"
    cfg = LazyConfig.load(REPO / "projects" / "rt_detr" / "configs" / "rtdetrv2_r18vd_120e_coco.py")
    cfg.model.encoder.eval_spatial_size = [320, 480]
    model = instantiate(cfg.model)
    with pytest.raises(CheckpointMismatchError, match="eval_spatial_size"):
        load_rtdetr_checkpoint(model, {"model": sd})
    anchors = model.decoder.anchors.clone()
    report = load_rtdetr_checkpoint(model, {"model": sd}, constant_buffers="model")
    assert report.ok
    assert torch.equal(model.decoder.anchors, anchors) and anchors.shape == (1, 40 * 60 + 20 * 30 + 10 * 15, 4)
    assert torch.equal(model.decoder.dec_score_head[0].weight, sd["decoder.dec_score_head.0.weight"])
    sd["decoder.decoder.layers.1.cross_attn.num_points_scale"] = torch.full((12,), 0.5)
    with pytest.raises(CheckpointMismatchError, match="num_points"):
        load_rtdetr_checkpoint(model, {"model": sd}, constant_buffers="model")


def test_frozen_bn_drops_num_batches_tracked():
    from tprd.checkpoint.rtdetr import load_rtdetr_checkpoint
    from tprd.modeling.presnet import FrozenBatchNorm2d, PResNet

    net = PResNet(depth=18, freeze_norm=True, freeze_at=0, return_idx=[1, 2, 3])
    assert isinstance(net.conv1.conv1_1.norm, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert all(p.requires_grad for p in net.res_layers.parameters())
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["conv1.conv1_1.norm.num_batches_tracked"] = torch.tensor(5)
    assert load_rtdetr_checkpoint(net, sd).ok
