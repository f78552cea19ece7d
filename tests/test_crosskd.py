"""CrossKD: the gradient path student memory -> frozen teacher decoder -> CrossKD terms, on the three
detector families; the crossed pass equals the teacher's own decoding of that memory; TPRD variant."""
import json
import math
from pathlib import Path

import pytest
import torch

from tprd.distill import CrossKD, Distiller
from tprd.distill.methods.crosskd import crossed_teacher_outputs

from test_distiller import batch, run_with_stats, tiny_dab, tiny_deformable, tiny_dino

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAMILIES = {
    "deformable": lambda **kw: tiny_deformable(**kw),
    "dab": lambda **kw: tiny_dab(**kw),
    "dino": lambda **kw: tiny_dino(**kw),
}

# student parts the crossed memory comes from (must get a gradient), and the student's decoder side
# (must get none from CrossKD alone)
UPSTREAM = ("backbone.", "neck.", "input_proj.", "transformer.encoder.", "transformer.level_embeds")
DECODER = ("transformer.decoder.", "class_embed", "bbox_embed", "query_embedding", "anchor_box_embed",
           "transformer.tgt_embed", "transformer.enc_output", "label_enc", "transformer.reference_points")


def _distiller(family, refine=False):
    make = FAMILIES[family]
    student = make(seed=1, depth=18)
    teacher = make(seed=2, depth=18)
    method = CrossKD(refine=refine)
    return Distiller(student, teacher, [method]).train(), method


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_crosskd_gradient_reaches_student_encoder_only_never_the_teacher(family):
    distiller, _ = _distiller(family)
    losses = distiller(batch(num_classes=3))
    crosskd = {k: v for k, v in losses.items() if k.startswith("distill_crosskd_")}
    assert {"distill_crosskd_class", "distill_crosskd_l1", "distill_crosskd_giou", "distill_crosskd_class_0"} <= set(crosskd)
    assert all(torch.isfinite(v) for v in crosskd.values())
    distiller.zero_grad(set_to_none=True)
    sum(crosskd.values()).backward()

    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    named = dict(distiller.student.named_parameters())
    upstream = {n: p for n, p in named.items() if n.startswith(UPSTREAM) and p.requires_grad}
    decoder = {n: p for n, p in named.items() if n.startswith(DECODER)}
    assert upstream and decoder
    # the graph reaches every trainable parameter of the backbone, neck / projection and encoder ...
    assert not [n for n, p in upstream.items() if p.grad is None]
    # ... with a non-zero gradient in each part (single tensors may be exactly 0 at init, e.g. the
    # level embeddings, which only feed the zero-initialised sampling-offset / attention layers)
    parts = ("backbone.", ("neck.", "input_proj."), "transformer.encoder.")
    for prefix in parts:
        grads = [p.grad.abs().sum() for n, p in upstream.items() if n.startswith(prefix)]
        assert grads and float(sum(grads)) > 0, prefix
    assert all(p.grad is None for p in decoder.values()), [n for n, p in decoder.items() if p.grad is not None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_crossed_pass_is_the_teachers_decoding_of_the_student_memory(family):
    """Feeding the teacher's *own* memory through the crossing gives exactly its own predictions."""
    distiller, _ = _distiller(family)
    teacher = distiller.teacher
    images = teacher.preprocess(batch(num_classes=3))
    with torch.no_grad():
        own = teacher.forward_outputs(images)
        crossed = crossed_teacher_outputs(teacher, own.taps)
    torch.testing.assert_close(crossed.main.logits, own.main.logits)
    torch.testing.assert_close(crossed.main.boxes, own.main.boxes)


def test_crosskd_identical_models_by_hand_and_tprd_stats():
    """Student = teacher: the crossed predictions are the teacher's own, so the matching is the
    identity, L1 = 0 and 1 − GIoU = 0 at every stage, and the soft-BCE class term is the teacher's
    own binary entropy Σ_q Σ_c H(σ(z_qc)) / (B·N). With refine=True the TPRD diagnostics are logged."""
    student = tiny_deformable(seed=2)
    teacher = tiny_deformable(seed=2)
    data = batch(num_classes=3)
    distiller = Distiller(student, teacher, [CrossKD()]).eval()
    losses = distiller.forward_train(data)
    with torch.no_grad():
        z = teacher.forward_outputs(teacher.preprocess(data)).main.logits.double()  # [L,B,N,C]
    p = z.sigmoid()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum((1, 2, 3)) / (z.shape[1] * z.shape[2])
    for l, key in ((z.shape[0] - 1, ""), (0, "_0")):
        assert float(losses[f"distill_crosskd_l1{key}"]) < 1e-5
        # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
        assert float(losses[f"distill_crosskd_giou{key}"]) < 1e-3
        assert abs(float(losses[f"distill_crosskd_class{key}"]) - float(entropy[l])) < 1e-4
    distiller = Distiller(student, teacher, [CrossKD(refine=True)]).eval()
    _, stats = run_with_stats(distiller, data, distiller.forward_train)
    assert any(k.startswith("tprd_crosskd_") and k.endswith("refined_frac") for k in stats)


def test_requires_grad_never_thaws_the_teacher():
    distiller, _ = _distiller("deformable")
    distiller.requires_grad_(True)
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    next(distiller.teacher.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="teacher must stay frozen"):
        distiller(batch(num_classes=3))


# ------------------------------------------------------------------------------------------------
# every new synthetic config through the training entry point (shared with test_qskd.py)
# ------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def synthetic_configs(folder):
    return sorted(REPO.glob(f"projects/*/cfg_distill/{folder}/*_synthetic.py"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from tprd.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=3)
    return root


def train_through_entry_point(path, datasets, out, monkeypatch, method):
    """One iteration of ``path`` through ``tprd.engine.main.main`` (what ``projects/<det>/train_net.py``
    runs); checks finite, present terms of ``method`` and, for ``_TPRD`` folders, TPRD diagnostics."""
    from tprd.engine.defaults import default_argument_parser
    from tprd.engine.main import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    args = default_argument_parser().parse_args([
        "--config-file", str(path), f"train.output_dir={out}", "train.max_iter=1", "train.eval_period=0",
        "train.log_period=1", "train.checkpointer.period=100",
    ])
    main(args)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = [m for m in metrics if "total_loss" in m][-1]
    terms = {k: v for k, v in last.items() if k.startswith(f"distill_{method}_")}
    assert terms and all(math.isfinite(v) for v in terms.values()), terms
    assert math.isfinite(last["total_loss"])
    if path.parent.name.endswith("_TPRD"):
        assert any(k.startswith(f"tprd_{method}_") for k in last), sorted(last)
    return terms


@pytest.mark.parametrize("path", synthetic_configs("CrossKD") + synthetic_configs("CrossKD_TPRD"),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_crosskd_synthetic_configs_train_through_the_entry_point(path, datasets, tmp_path, monkeypatch):
    terms = train_through_entry_point(path, datasets, tmp_path / "run", monkeypatch, "crosskd")
    assert {"distill_crosskd_class", "distill_crosskd_l1", "distill_crosskd_giou", "distill_crosskd_giou_0"} <= set(terms)
