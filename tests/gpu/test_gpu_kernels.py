"""The fused kernels a GPU run goes through and the CPU suite cannot: Megatron's fused SwiGLU (``bias_activation_fusion``,
on whenever CUDA is present) and Transformer Engine's norms (fused into ``linear_qkv`` / ``linear_fc1``, and the q/k
norms), each against the plain PyTorch computation, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_save.checkpoint import build_model_from_checkpoint

pytestmark = pytest.mark.gpu

# Relative to the largest entry. fp32: the same operations, a few ulp apart. bf16: the fused kernel computes in fp32
# and rounds once, the plain path rounds after each operation (bf16 has 8 bits of mantissa: 4e-3 per rounding).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# TE's GEMMs may run fp32 in TF32 (10-bit mantissa); a norm weight left out or misread is O(0.1) off here.
TE_FP32_TOLERANCE = 5e-3


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_swiglu_equals_silu_gate_times_up(dtype):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 4, 2 * 96, device="cuda", generator=generator).to(dtype).requires_grad_()  # [S, B, 2F]
    x_ref = x.detach().clone().requires_grad_()
    fused = bias_swiglu_impl(x, None)
    gate, up = x_ref.float().chunk(2, dim=-1)
    plain = F.silu(gate) * up  # [S, B, F] in fp32
    upstream = torch.randn(plain.shape, device="cuda", generator=generator)
    fused.backward(upstream.to(dtype))
    plain.backward(upstream)
    assert fused.shape == plain.shape and fused.dtype == dtype
    assert _relative(fused, plain) <= TOLERANCE[dtype]
    assert _relative(x.grad, x_ref.grad) <= TOLERANCE[dtype]


def _made_by(tensor: torch.Tensor) -> str:
    """The autograd node that computed ``tensor``, past the views that reshape its result."""
    node = tensor.grad_fn
    while node is not None and type(node).__name__.startswith(("View", "Reshape", "UnsafeView")):
        node = node.next_functions[0][0]
    return type(node).__name__


def _swiglu_inputs_of_fc2(model) -> list[str]:
    """Runs nothing: registers hooks that record, per MLP forward, the autograd node that made fc2's input."""
    seen: list[str] = []
    for layer in model.decoder.layers:
        layer.mlp.linear_fc2.register_forward_pre_hook(lambda module, args: seen.append(_made_by(args[0])))
    return seen


def test_a_gpu_model_runs_the_fused_swiglu_and_it_matches_the_plain_path(tiny_models, world_of_one):
    from helpers import token_batch

    from megatron_save.models.forward import run_model

    model, _, _ = build_model_from_checkpoint(tiny_models["qwen3-lm"]["mg"])  # the auto spec, as a run builds it
    assert model.config.bias_activation_fusion  # set whenever CUDA is present
    seen = _swiglu_inputs_of_fc2(model)
    input_ids, _ = token_batch(batch=2, seq=16)
    input_ids = input_ids.cuda()
    position_ids = torch.arange(input_ids.shape[1], device="cuda").expand_as(input_ids)
    outputs, grads = [], []
    for fused in (True, False):
        model.config.bias_activation_fusion = fused  # every MLP reads the shared config at each forward
        model.zero_grad(set_to_none=True)
        logits = run_model(model, input_ids, position_ids)
        logits.float().square().mean().backward()
        outputs.append(logits.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    model.config.bias_activation_fusion = True
    layers = len(model.decoder.layers)
    assert all("SwiGLU" in name for name in seen[:layers]), seen  # the fused autograd function ran
    assert not any("SwiGLU" in name for name in seen[layers:]), seen
    assert _relative(outputs[0], outputs[1]) <= 1e-4
    for name, grad in grads[1].items():
        assert _relative(grads[0][name], grad) <= 1e-3, name


@pytest.fixture
def te_model(te, tiny_models):
    """The tiny Qwen3 LM through the TE spec (``te``: skipped at collection where TE does not import)."""
    return build_model_from_checkpoint(tiny_models["qwen3-lm"]["mg"], spec_backend="te")[0]


def test_te_norm_fused_into_linear_qkv_equals_rmsnorm_then_linear(te_model):
    """TE's LayerNormColumnParallelLinear: RMSNorm with ``layer_norm_weight`` (not zero-centred), then the GEMM."""
    config = te_model.config
    for linear in (te_model.decoder.layers[0].self_attention.linear_qkv, te_model.decoder.layers[0].mlp.linear_fc1):
        x = torch.randn(16, 2, config.hidden_size, device="cuda", requires_grad=True)  # [S, B, H]
        x_ref = x.detach().clone().requires_grad_()
        norm_weight = linear.layer_norm_weight
        norm_ref = norm_weight.detach().clone().requires_grad_()
        out = linear(x)[0]
        ref = F.linear(F.rms_norm(x_ref, (config.hidden_size,), norm_ref, config.layernorm_epsilon),
                       linear.weight.detach(), None if linear.bias is None or linear.bias.numel() == 0
                       else linear.bias.detach())
        upstream = torch.randn_like(ref)
        out.backward(upstream)
        ref.backward(upstream)
        assert _relative(out, ref) <= TE_FP32_TOLERANCE
        assert _relative(x.grad, x_ref.grad) <= TE_FP32_TOLERANCE
        assert _relative(norm_weight.grad, norm_ref.grad) <= TE_FP32_TOLERANCE


def test_te_qk_norms_equal_torch_rmsnorm(te_model):
    attention = te_model.decoder.layers[0].self_attention
    head_dim = te_model.config.kv_channels
    for norm in (attention.q_layernorm, attention.k_layernorm):
        x = torch.randn(16, 2, 4, head_dim, device="cuda")  # [S, B, heads, d]
        ref = F.rms_norm(x, (head_dim,), norm.weight.detach(), te_model.config.layernorm_epsilon)
        assert _relative(norm(x), ref) <= 1e-5
