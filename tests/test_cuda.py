"""Checks that need a CUDA device (skipped without one; ``tools/gpu_check.py`` runs them on a GPU)."""
import pytest
import torch

from tprd.layers.msda_function import msda_function

from test_msda_function import SHAPES, STARTS, random_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_triton_kernel_passes_its_first_use_check_on_this_gpu():
    pytest.importorskip("triton")
    from tprd.layers.msda_triton import self_check

    assert self_check(torch.device("cuda")) is None


@cuda
@pytest.mark.parametrize("backend", ["triton", "pytorch", "grid_sample"])
def test_cuda_backends_equal_the_cpu_function(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    from tprd.layers.ms_deform_attn import multi_scale_deformable_attention

    value, loc, weights = random_case(torch.float32, seed=7)
    results = []
    for device in ("cpu", "cuda"):
        inputs = [t.to(device).requires_grad_(True) for t in (value, loc, weights)]
        fn = msda_function if device == "cpu" else (
            lambda v, s, st, l, w: multi_scale_deformable_attention(v, s, st, l, w, backend=backend))
        out = fn(inputs[0], SHAPES.to(device), STARTS.to(device), inputs[1], inputs[2])
        grad = torch.ones_like(out)
        results.append([t.cpu() for t in (out, *torch.autograd.grad(out, inputs, grad))])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@cuda
def test_auto_on_cuda_is_a_gpu_backend():
    from tprd.layers.ms_deform_attn import resolve_msda_backend

    assert resolve_msda_backend("auto", torch.zeros(1, device="cuda")) in ("triton", "cuda_ext", "pytorch")


@cuda
@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_deformable_detr_on_cuda_equals_cpu(backend):
    """A whole detector (box refinement, two-stage) on the GPU: the decoder's outputs, the training
    losses and the gradients equal the CPU model's (fp32; TF32 off so cuDNN's convolutions are exact
    fp32 too)."""
    if backend == "triton":
        pytest.importorskip("triton")
    import copy

    from test_deformable_detr import batch, tiny_model
    from tprd.layers.activation_checkpoint import set_layer_options

    cpu = tiny_model(with_box_refine=True, as_two_stage=True)
    set_layer_options(cpu, msda_backend="pytorch")  # no C++ build on the GPU machine for this
    gpu = copy.deepcopy(cpu).cuda()
    set_layer_options(gpu, msda_backend=backend)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            outputs = [m.decode_memory(m.encode_images(m.preprocess(batch()))[0]).main for m in (cpu.eval(), gpu.eval())]
        torch.testing.assert_close(outputs[1].logits.cpu(), outputs[0].logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outputs[1].boxes.cpu(), outputs[0].boxes, atol=1e-5, rtol=1e-4)
        losses, grads = [], []
        for m in (cpu.train(), gpu.train()):
            m.zero_grad()
            out = m(batch())
            sum(out.values()).backward()
            losses.append({k: v.item() for k, v in out.items()})
            grads.append({n: p.grad.cpu() for n, p in m.named_parameters() if p.grad is not None})
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert losses[1].keys() == losses[0].keys()
    for k in losses[0]:
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-4, abs=1e-5), k
    assert grads[1].keys() == grads[0].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")
