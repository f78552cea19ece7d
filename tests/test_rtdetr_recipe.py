"""RT-DETRv2's training recipe (docs/rt_detr.md#training-recipe): the regex parameter groups of
``configs/common/rtdetr_optim.py`` and the EMA warmup of ``train.model_ema.warmups``."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_teacher():
    from tprd.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(REPO / "projects/rt_detr/configs/rtdetrv2_r50vd_synthetic.py"))
    cfg.model.backbone.freeze_norm = True  # as the official R50vd: FrozenBN, no trainable backbone norms
    cfg.model.backbone.freeze_at = 0
    return instantiate(cfg.model)


def _groups(optimizer_name, model):
    from tprd.config import get_config, instantiate

    opt = get_config("common/rtdetr_optim.py")[optimizer_name]
    opt.params.model = model
    optimizer = instantiate(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_r50_groups_backbone_at_1e_5_and_no_decay_on_encoder_decoder_norms(synthetic_teacher):
    groups = _groups("AdamW", synthetic_teacher)
    (backbone, lr_b, wd_b), (norms, lr_n, wd_n), (rest, lr_r, wd_r) = groups
    assert (lr_b, wd_b, lr_n, wd_n, lr_r, wd_r) == (1e-5, 1e-4, 1e-4, 0.0, 1e-4, 1e-4)
    assert backbone and all(n.startswith("backbone.") and "norm" not in n for n in backbone)
    assert norms and all(n.startswith(("encoder.", "decoder.")) and ("norm" in n or "bn" in n) for n in norms)
    trainable = {n for n, p in synthetic_teacher.named_parameters() if p.requires_grad}
    assert backbone | norms | rest == trainable and not (backbone & norms)
    assert "decoder.decoder.layers.0.norm1.weight" in norms and "encoder.input_proj.0.norm.weight" in norms


def test_r18_groups_one_lr_no_decay_on_norms(synthetic_teacher):
    (norms, lr_n, wd_n), (rest, lr_r, wd_r) = _groups("AdamW_r18", synthetic_teacher)
    assert (lr_n, wd_n, lr_r, wd_r) == (1e-4, 0.0, 1e-4, 1e-4)
    assert all("norm" in n or "bn" in n for n in norms) and not any("norm" in n for n in rest)


def test_ema_warmup_follows_the_reference_and_is_checkpointed():
    from tprd.engine.ema import ModelEMA

    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.9999, warmups=2000)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    d = 0.9999 * (1 - math.exp(-1 / 2000))  # ~5e-4: the first averages follow the weights
    assert ema.current_decay() == pytest.approx(d)
    assert torch.allclose(ema.average["weight"], before + (1 - d), atol=1e-6)
    ema.update()
    other = ModelEMA(model, decay=0.9999, warmups=2000)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and other.current_decay() == pytest.approx(0.9999 * (1 - math.exp(-2 / 2000)))
    plain = ModelEMA(model, decay=0.9)
    plain.update()
    assert plain.current_decay() == 0.9 and "_ema_updates" not in plain.state_dict()
