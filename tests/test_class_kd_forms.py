"""The class-KD forms of the _TPRD variants (option ``class_kd``): the reference's softmax TPRD-CKD,
the sigmoid form and TPRD-CKD plus the baselines' soft-BCE, on hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from tprd.distill.tprd import CLASS_KD_FORMS, decoupled_kd, sigmoid_decoupled_kd, tprd_class_kd


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _binary_kl(r, p):
    return r * math.log(r / p) + (1 - r) * math.log((1 - r) / (1 - p))


def test_sigmoid_form_by_hand():
    s = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, -3.0, 0.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
    positive = torch.tensor([True, False])
    target = torch.tensor([0, -1])
    out = sigmoid_decoupled_kd(s, t, positive, target, alpha=2.0, beta=0.5)
    kl = [[_binary_kl(_sig(t[i, k].item()), _sig(s[i, k].item())) for k in range(3)] for i in range(2)]
    # positive pair, target class 0: alpha * KL_0 + beta * (KL_1 + KL_2); negative pair: sum of all
    expected = [2.0 * kl[0][0] + 0.5 * (kl[0][1] + kl[0][2]), sum(kl[1])]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_sigmoid_form_zero_when_equal_and_gradient_of_soft_bce():
    torch.manual_seed(0)
    t = torch.randn(6, 5)
    positive = torch.tensor([True, False, True, False, True, False])
    target = torch.tensor([1, -1, 4, -1, 0, -1])
    assert sigmoid_decoupled_kd(t.clone(), t, positive, target).abs().max() < 1e-6
    # alpha = beta = 1: the gradient is that of soft-BCE against the teacher's sigmoid scores
    s = torch.randn(6, 5, requires_grad=True)
    sigmoid_decoupled_kd(s, t, positive, target).sum().backward()
    g_sig = s.grad.clone()
    s.grad = None
    F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="sum").backward()
    assert torch.allclose(g_sig, s.grad, atol=1e-6)
    # and it carries a foreground/background signal the softmax form lacks: shifting every logit of
    # a row by the same amount leaves softmax TPRD-CKD unchanged but not the sigmoid form
    shifted = t + 3.0
    assert torch.allclose(decoupled_kd(shifted, t, positive, target), torch.zeros(6), atol=1e-5)
    assert (sigmoid_decoupled_kd(shifted, t, positive, target) > 0.1).all()


def test_forms_dispatch_and_sum():
    torch.manual_seed(1)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    positive = torch.tensor([True, False, True, False])
    target = torch.tensor([2, -1, 0, -1])
    assert torch.equal(tprd_class_kd(s, t, positive, target, 0.7, 1.3), decoupled_kd(s, t, positive, target, 0.7, 1.3))
    assert torch.equal(tprd_class_kd(s, t, positive, target, 0.7, 1.3, form="sigmoid"),
                       sigmoid_decoupled_kd(s, t, positive, target, 0.7, 1.3))
    added = tprd_class_kd(s, t, positive, target, form="decoupled+bce")
    bce = F.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="none").sum(-1)
    assert torch.allclose(added, decoupled_kd(s, t, positive, target) + bce, atol=1e-6)
    with pytest.raises(ValueError, match="class_kd"):
        tprd_class_kd(s, t, positive, target, form="softmax")
    assert CLASS_KD_FORMS[0] == "decoupled"


@pytest.mark.parametrize("form", ["sigmoid", "decoupled+bce"])
def test_class_kd_option_reaches_the_method_and_changes_only_the_class_term(form):
    from pathlib import Path

    from tprd.config import instantiate
    from tprd.engine.main import load_config

    cfg_path = Path(__file__).resolve().parents[1] / "projects/dino/cfg_distill/DETRDistill_TPRD/dino_r50_distill_r18_synthetic.py"
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 64, 80, generator=g) * 255, "height": 64, "width": 80,
              "gt_boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 5.0, 70.0, 30.0]]),
              "gt_classes": torch.tensor([1, 3])} for _ in range(2)]
    losses = {}
    for f in ("decoupled", form):
        cfg = load_config(str(cfg_path), [f"model.methods.detrdistill.class_kd={f}"])
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        assert [m.tprd.class_kd for m in model.methods] == [f]
        model.train()
        torch.manual_seed(0)
        losses[f] = {k: float(v) for k, v in model(batch).items()}
    base, other = losses["decoupled"], losses[form]
    class_keys = [k for k in base if k.startswith("distill_") and "class" in k]
    assert class_keys, sorted(base)
    assert any(abs(base[k] - other[k]) > 1e-6 for k in class_keys)
    for k in base:  # the refined targets, the matching and every other term stay as they were
        if k not in class_keys:
            assert abs(base[k] - other[k]) <= 1e-5 * max(1.0, abs(base[k])), k
