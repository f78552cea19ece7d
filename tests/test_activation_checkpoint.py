"""use_checkpoint: the same losses and gradients (dropout included) with each layer recomputed in backward."""
import pytest
import torch
from torch import nn

import test_dab_detr
import test_deformable_detr
import test_dino
from tprd.layers.activation_checkpoint import set_layer_options


def with_dropout(model, p=0.1):
    """The tiny test models have no dropout; give every dropout in the transformer probability p."""
    for m in model.transformer.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = p
    return model


def losses_and_grads(model, data, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks / denoising noise for both runs
    losses = model(data)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def count_layer_calls(model):
    calls = []
    for enc_dec in (model.transformer.encoder, model.transformer.decoder):
        enc_dec.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))  # recompute may stop early
    return calls


@pytest.mark.parametrize("build", [
    lambda: (test_deformable_detr.tiny_model(with_box_refine=True), test_deformable_detr.batch()),
    lambda: (test_dino.tiny_model(), test_dino.batch()),
    lambda: (test_dab_detr.tiny_model(criterion=test_dab_detr._criterion()), test_dab_detr._train_batch()),
], ids=["deformable_detr", "dino", "dab_detr"])
def test_checkpointing_is_exact_with_dropout(build):
    model, data = build()
    model = with_dropout(model).train()
    calls = count_layer_calls(model)
    plain_losses, plain_grads = losses_and_grads(model, data, seed=5)
    assert len(calls) == 2  # first encoder and decoder layer, once each
    other_losses, _ = losses_and_grads(model, data, seed=6)
    assert any(not torch.equal(other_losses[k], plain_losses[k]) for k in plain_losses)  # dropout is active

    set_layer_options(model, use_checkpoint=True)
    calls.clear()
    ckpt_losses, ckpt_grads = losses_and_grads(model, data, seed=5)
    assert len(calls) == 4  # each checkpointed layer ran again in backward
    assert plain_losses.keys() == ckpt_losses.keys() and plain_grads.keys() == ckpt_grads.keys()
    for k in plain_losses:
        assert torch.equal(plain_losses[k], ckpt_losses[k]), k
    for n in plain_grads:
        assert torch.allclose(plain_grads[n], ckpt_grads[n], rtol=0, atol=1e-7), n


def test_checkpointing_is_off_by_default_and_in_no_grad():
    model = test_deformable_detr.tiny_model()
    assert not model.transformer.encoder.use_checkpoint and not model.transformer.decoder.use_checkpoint
    set_layer_options(model, use_checkpoint=True)
    calls = count_layer_calls(model.eval())
    with torch.no_grad():
        model(test_deformable_detr.batch())
    assert len(calls) == 2


def test_encoder_only_checkpointing_recomputes_the_encoder_alone():
    model = with_dropout(test_deformable_detr.tiny_model(with_box_refine=True)).train()
    data = test_deformable_detr.batch()
    plain_losses, plain_grads = losses_and_grads(model, data, seed=5)
    set_layer_options(model, use_checkpoint="encoder")
    assert model.transformer.encoder.use_checkpoint and not model.transformer.decoder.use_checkpoint
    calls = {"encoder": 0, "decoder": 0}
    model.transformer.encoder.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.transformer.decoder.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    losses, grads = losses_and_grads(model, data, seed=5)
    assert calls == {"encoder": 2, "decoder": 1}  # the encoder layer ran again in backward
    for k in plain_losses:
        assert torch.equal(plain_losses[k], losses[k]), k
    for n in plain_grads:
        assert torch.allclose(plain_grads[n], grads[n], rtol=0, atol=1e-7), n
    set_layer_options(model, use_checkpoint="decoder")
    assert not model.transformer.encoder.use_checkpoint and model.transformer.decoder.use_checkpoint
    with pytest.raises(ValueError, match="use_checkpoint must be one of"):
        set_layer_options(model, use_checkpoint="backbone")


@pytest.mark.parametrize("build", [
    lambda: (test_deformable_detr.tiny_model(with_box_refine=True), test_deformable_detr.batch()),
    lambda: (test_dino.tiny_model(), test_dino.batch()),
], ids=["deformable_detr", "dino"])
def test_encoder_attention_checkpointing_recomputes_attention_blocks_only(build):
    model, data = build()
    model = with_dropout(model).train()
    plain_losses, plain_grads = losses_and_grads(model, data, seed=5)
    set_layer_options(model, use_checkpoint="encoder_attention")
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    assert encoder.use_checkpoint == "attention" and not decoder.use_checkpoint
    calls = {"attention": 0, "ffn": 0, "decoder": 0}

    def count(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    encoder.layers[0].self_attn.register_forward_pre_hook(count("attention"))
    encoder.layers[0].ffn.register_forward_pre_hook(count("ffn"))
    decoder.layers[0].register_forward_pre_hook(count("decoder"))
    losses, grads = losses_and_grads(model, data, seed=5)
    assert calls == {"attention": 2, "ffn": 1, "decoder": 1}
    for k in plain_losses:
        assert torch.equal(plain_losses[k], losses[k]), k
    assert plain_grads.keys() == grads.keys()
    for n in plain_grads:
        assert torch.allclose(plain_grads[n], grads[n], rtol=0, atol=1e-7), n


def test_encoder_attention_falls_back_to_whole_layers_elsewhere():
    model = test_dab_detr.tiny_model(criterion=test_dab_detr._criterion())
    set_layer_options(model, use_checkpoint="encoder_attention")
    assert model.transformer.encoder.use_checkpoint is True
    assert not model.transformer.decoder.use_checkpoint
