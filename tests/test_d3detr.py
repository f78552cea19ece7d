"""D³ETR (docs/methods.md#d3detr): attention terms by hand and under a permutation, identical models give
zero distances on all three detectors (DINO's denoising queries excluded), gradients reach the
student's attention."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from tprd.distill import D3DETR, Distiller
from tprd.distill.methods.d3detr import cross_attention_kd, self_attention_kd

from test_distiller import batch, run_with_stats, tiny_dab, tiny_deformable, tiny_dino

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_self_attention_term_is_zero_when_maps_agree_under_the_permutation():
    g = torch.Generator().manual_seed(0)
    L, B, M, N = 2, 2, 3, 5
    teacher = torch.rand(L, B, M, N, N, generator=g).softmax(-1)
    perm = torch.stack([torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) for _ in range(L)])
    # student query n plays teacher query perm[n]: A^s[n, n'] = A^t[perm[n], perm[n']]
    student = torch.empty_like(teacher)
    for l in range(L):
        for b in range(B):
            p = perm[l, b]
            student[l, b] = teacher[l, b][:, p][:, :, p]
    ident = torch.arange(N).expand(L, B, N)
    assert torch.allclose(self_attention_kd(student, teacher, ident, perm), torch.zeros(L), atol=1e-7)
    # the same maps compared without the permutation differ
    assert (self_attention_kd(student, teacher, ident, ident) > 1e-4).all()


def test_self_and_cross_attention_terms_by_hand():
    # one stage, one image, one head, two queries; pairs (0 -> 1), (1 -> 0)
    s = torch.tensor([[[[[0.5, 0.5], [1.0, 0.0]]]]])
    t = torch.tensor([[[[[0.0, 1.0], [0.25, 0.75]]]]])
    # teacher permuted: rows/cols (1, 0) -> [[0.75, 0.25], [1.0, 0.0]]
    want = ((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2 + 0.0 + 0.0) / 4
    got = self_attention_kd(s, t, torch.tensor([[[0, 1]]]), torch.tensor([[[1, 0]]]))
    assert torch.allclose(got, torch.tensor([want]))
    cs = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]]])  # [L=1,B=2,M=1,S=3]
    ct = torch.tensor([[[[1.0, 0.0, 3.0]], [[1.0, 1.0, 1.0]]]])
    assert torch.allclose(cross_attention_kd(cs, ct), torch.tensor([(4.0 + 3.0) / 6]))
    with pytest.raises(ValueError, match="cross-attention maps differ"):
        cross_attention_kd(cs, ct[..., :2])


@pytest.mark.parametrize("make", [tiny_deformable, tiny_dab, tiny_dino])
@pytest.mark.parametrize("refine", [False, True])
def test_identical_models_give_zero_distances(make, refine):
    teacher = make(seed=2)
    student = copy.deepcopy(teacher)
    distiller = Distiller(student, teacher, [D3DETR(refine=refine)]).train()
    losses, stats = run_with_stats(distiller, batch())
    d = {k: v for k, v in losses.items() if k.startswith("distill_d3detr_")}
    assert len(d) == 2 * len(D3DETR.terms)  # two stages
    for key, value in d.items():
        if "class" not in key:  # weighted values; the soft-BCE class term is the teacher's entropy
            # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
            assert float(value.abs()) < (1e-3 if "giou" in key else 1e-4), (key, float(value))
    # the two groups decode the same queries here, so their class terms agree too
    assert torch.allclose(losses["distill_d3detr_class"], losses["distill_d3detr_fixed_class"], atol=1e-5)
    if refine:
        assert any(k.startswith("tprd_d3detr_") for k in stats)


def test_attention_terms_reach_the_students_attention_only():
    teacher, student = tiny_deformable(seed=2), tiny_deformable(seed=1)
    # freshly initialised sampling offsets / attention weights do not depend on the query (detrex
    # init): move them, so that the fixed group's maps differ between the models
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.transformer.decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    distiller = Distiller(student, teacher, [D3DETR()]).train()
    losses = distiller(batch())
    layer = student.transformer.decoder.layers[1]
    for key, params in (("distill_d3detr_self_attn", [layer.self_attn.in_proj_weight]),
                        ("distill_d3detr_fixed_cross_attn", [layer.cross_attn.sampling_offsets.weight,
                                                              layer.cross_attn.attention_weights.weight])):
        grads = torch.autograd.grad(losses[key], params, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), key
    assert all(p.grad is None for p in teacher.parameters())


def test_zero_weight_group_is_not_decoded():
    teacher, student = tiny_deformable(seed=2), tiny_deformable(seed=1)
    weights = {t: (0.0 if t.startswith("fixed_") else 1.0) for t in D3DETR.terms}
    distiller = Distiller(student, teacher, [D3DETR(weights=weights)]).train()
    losses = distiller(batch())
    assert not any(k.startswith("distill_d3detr_fixed_") for k in losses)
    assert "distill_d3detr_self_attn" in losses


# ------------------------------------------------------------------------------------------------
# every D3DETR synthetic config through the training entry point (train_net.py's main)
# ------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = sorted(REPO.glob("projects/*/cfg_distill/D3DETR*/*_synthetic.py"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from tprd.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=3)
    return root


@pytest.mark.parametrize("path", SYNTHETIC, ids=lambda p: p.relative_to(REPO).as_posix())
def test_synthetic_config_trains_through_the_entry_point(path, datasets, tmp_path, monkeypatch):
    from tprd.engine.defaults import default_argument_parser
    from tprd.engine.main import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = tmp_path / "run"
    args = default_argument_parser().parse_args([
        "--config-file", str(path), f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=0",
        "train.log_period=1", "train.checkpointer.period=100", "dataloader.test.dataset.names=synthetic_val",
    ])
    main(args)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = [m for m in metrics if "total_loss" in m][-1]
    for term in D3DETR.terms:
        assert f"distill_d3detr_{term}" in last and f"distill_d3detr_{term}_0" in last, term
    assert all(math.isfinite(v) for k, v in last.items() if k.startswith(("loss_", "distill_", "total_loss")))
    tprd = [k for k in last if k.startswith("tprd_d3detr_")]
    assert bool(tprd) == path.parent.name.endswith("_TPRD")


def test_without_attention_weights_no_maps_are_computed():
    teacher, student = tiny_deformable(seed=2), tiny_deformable(seed=1)
    weights = {t: (0.0 if t.endswith("attn") else 1.0) for t in D3DETR.terms}
    method = D3DETR(weights=weights)
    distiller = Distiller(student, teacher, [method]).train()
    seen = {}
    forward = student.forward_outputs

    def spy(*args, **kwargs):
        seen["return_attention"] = kwargs.get("return_attention", False)
        return forward(*args, **kwargs)

    student.forward_outputs = spy
    losses = distiller(batch())
    assert seen == {"return_attention": False} and "attention" not in distiller.needs
    assert "distill_d3detr_fixed_l1" in losses and "distill_d3detr_self_attn" not in losses
