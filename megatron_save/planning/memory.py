"""Per-GPU bytes of a stage-3 run (policy, reference, reward model, rollout engine) at a TP / PP / EP / DP layout.

Pure arithmetic on a model's config numbers, written to match what Megatron-Core 0.16 allocates as this package
builds it (``megatron_save.models.builder``, ``megatron_save.trainers.optimizer.build_train_state``):

- Weights: every parameter tensor of one GPU of a pipeline stage (tensor-parallel shards are equal on every rank).
  With the distributed optimizer, DDP moves the weights of a trained model into its contiguous, padded buffer.
- Gradients: DDP's buffer, fp32 (``grad_reduce_in_fp32=True``), one per kind of parameter (dense, and experts,
  which reduce over the expert-data-parallel group). Without the distributed optimizer it holds exactly the
  parameters; with it each parameter starts at a multiple of 64 elements and each bucket ends at a multiple of
  lcm(DP, 128) (one bucket per buffer, since ``overlap_grad_reduce`` is off; a tied embedding copy with PP > 1
  gets a bucket of its own).
- Optimizer: Adam's exp_avg and exp_avg_sq in fp32, plus fp32 main copies of 16-bit weights; the distributed
  optimizer keeps only this rank's shard of each buffer. Adam's per-tensor ``step`` counters are not counted:
  torch's Adam keeps them on the host, Transformer Engine's and Apex's FusedAdam one per group.
- Activations: the bytes saved for backward by one micro-batch, times the micro-batches in flight on a stage
  under the 1F1B schedule (PP - stage). See ``layer_activation_bytes`` for the per-tensor account.
- Rollout: the engine's own copy of the policy's weights and its KV cache (see ``rollout_bytes``).

Every part is counted as resident at once: a conservative total, since activations, the KV cache and an update's
optimizer state are not all live in the same phase. Not counted: the CUDA context, NCCL buffers, transient
workspace (a layer's forward temporaries, the fp32 copies of the logits before the loss) and fragmentation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
ROLLOUT_BACKENDS = ("transformers", "megatron", "vllm")
SPECS = ("te", "local")
# model_type -> (q/k/v biases, per-head q/k RMSNorm): the facts of megatron_save.models.families (its import
# would load Megatron-Core; a test checks the two agree).
FAMILY_FACTS = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True), "qwen3_moe": (False, True)}
FP32 = 4


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder that decide its memory; built from an HF config by ``architecture_from_hf``."""

    hidden: int
    """Hidden size h."""
    layers: int
    """Transformer layers."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key / value heads (GQA groups)."""
    head_dim: int
    """Width of one head (``head_dim`` when the config sets it, else hidden / heads)."""
    ffn: int
    """Intermediate width of a dense SwiGLU MLP."""
    vocab: int
    """Embedding rows."""
    tied: bool
    """The output projection shares the embedding weight."""
    qkv_bias: bool
    """Biases on q, k, v (Qwen2)."""
    qk_norm: bool
    """RMSNorm of width head_dim on each query and key head (Qwen3)."""
    reward_model: bool
    """A scalar reward head [1, h] on the last stage instead of the vocabulary projection."""
    num_experts: int = 0
    """Routed experts per MoE layer (0: dense model)."""
    experts_per_token: int = 0
    """Experts each token is routed to (top-k)."""
    moe_ffn: int = 0
    """Intermediate width of one expert's SwiGLU."""
    normalize_top_k: bool = True
    """Routing weights are the softmax over the top-k logits (``norm_topk_prob``); else the top-k entries of the
    softmax over all experts."""
    dense_layers: tuple[int, ...] = ()
    """Indices of the layers with a dense MLP in a MoE model (``mlp_only_layers``, ``decoder_sparse_step``)."""
    source: str = ""
    """Where the numbers came from (a config path or hub name), named in errors."""

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer``'s MLP is routed experts."""
        return self.num_experts > 0 and layer not in self.dense_layers


def architecture_from_hf(config: Any, reward_model: bool, source: str = "") -> Architecture:
    """The Architecture of a transformers config (any object with its attributes). ``reward_model``: the model
    carries the scalar head (a ``*ForSequenceClassification`` config, or a causal LM converted into a reward model
    with ``--as-reward-model``, whose lm_head the reward head replaces)."""
    named = f"{source}: " if source else ""
    if config.model_type not in FAMILY_FACTS:
        raise ValueError(f"{named}model_type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILY_FACTS))}")
    qkv_bias, qk_norm = FAMILY_FACTS[config.model_type]
    num_experts = int(getattr(config, "num_experts", 0) or 0) if config.model_type == "qwen3_moe" else 0
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    only_dense = set(getattr(config, "mlp_only_layers", None) or ())
    # transformers' Qwen3-MoE: layer i routes unless listed in mlp_only_layers or off the sparse step.
    dense_layers = tuple(i for i in range(config.num_hidden_layers)
                         if num_experts and (i in only_dense or (i + 1) % step != 0))
    return Architecture(
        hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        ffn=config.intermediate_size, vocab=config.vocab_size, tied=bool(config.tie_word_embeddings),
        qkv_bias=qkv_bias, qk_norm=qk_norm, reward_model=reward_model, num_experts=num_experts,
        experts_per_token=int(getattr(config, "num_experts_per_tok", 0) or 0) if num_experts else 0,
        moe_ffn=int(getattr(config, "moe_intermediate_size", 0) or 0) if num_experts else 0,
        normalize_top_k=bool(getattr(config, "norm_topk_prob", True)),
        dense_layers=dense_layers, source=source)


@dataclass(frozen=True)
class MemoryLayout:
    """A stage-3 layout and the run settings that decide its memory (both models share TP / PP / DP)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (layers split evenly over stages)."""
    dp: int = 1
    """Data-parallel size: world = TP x PP x DP."""
    ep: int = 1
    """Expert-parallel size of MoE models (carved out of TP x DP); dense models ignore it."""
    etp: int = 1
    """Tensor-parallel size inside each expert."""
    dtype: str = "bf16"
    """Weights' dtype: bf16 (with fp32 main copies in the optimizer) or fp32."""
    micro_batch: int = 1
    """Sequences per policy forward-backward (``policy.micro_batch_size``)."""
    reward_micro_batch: int = 1
    """Sequences per reward-model forward-backward (``reward.micro_batch_size`` prompts x G responses)."""
    prompt_length: int = 1024
    """Longest prompt in tokens."""
    response_length: int = 1024
    """Longest response in tokens (``rollout.sampling.max_new_tokens``)."""
    rollout_batch: int = 64
    """Sequences one rollout engine generates at once (``rollout.max_batch_size``): its KV cache holds them."""
    distributed_optimizer: bool = False
    """Optimizer states and main weights sharded over data-parallel ranks (``optim.use_distributed_optimizer``)."""
    recompute: bool = False
    """Full activation recompute (Megatron's uniform method, one layer per checkpoint): a what-if, since this
    stack does not set it."""
    offload_optimizer: bool = False
    """Adam moments and fp32 main copies on the host outside their model's update (``offload.optimizer``)."""
    offload_gradients: bool = False
    """Gradient buffers freed outside their model's update (``offload.gradients``)."""
    offload_reference: bool = False
    """Reference weights on the host except while its log-probs are computed (``offload.reference``)."""
    reference: bool = True
    """A KL reference policy exists (``policy.kl_coef > 0``)."""
    reward_trained: bool = True
    """The reward model is trained online (SAVE); false for a frozen RM (plain GRPO)."""
    value_head: bool = False
    """The reward model carries a value head [1, h] (SAVE's does)."""
    rollout_backend: str = "transformers"
    """transformers, megatron or vllm (``rollout.backend``)."""
    vllm_kv_cache_bytes: int | None = None
    """rollout.backend=vllm: the KV cache each engine reserves (``rollout.vllm.kv_cache_memory_gib``), whatever the
    rollout batch needs; None plans the cache the batch fills."""
    spec: str = "te"
    """Layer implementation the activation model follows: te (Transformer Engine, GPU) or local (Megatron-Core's
    own modules, what runs on CPU)."""
    fused_activation: bool = True
    """SwiGLU through Megatron's fused kernel (on GPU); False for the plain PyTorch path (CPU)."""

    @property
    def sequence(self) -> int:
        """Tokens of the longest sequence: prompt + response."""
        return self.prompt_length + self.response_length


@dataclass
class MemoryPlan:
    """Per-GPU bytes of a layout: the parts of the pipeline stage whose GPUs hold the most."""

    per_gpu_bytes: dict[str, int] = field(default_factory=dict)
    """``<model>_<part>`` -> bytes on one GPU of that stage, and ``total``, their sum."""
    stage: int = 0
    """The pipeline stage these bytes are of."""
    layout: MemoryLayout = field(default_factory=MemoryLayout)
    """What was planned."""

    @property
    def total(self) -> int:
        """The sum of the parts."""
        return self.per_gpu_bytes["total"]


@dataclass
class StageParams:
    """Parameter tensor sizes (elements) on one GPU of a pipeline stage, grouped as DDP buffers them."""

    dense: list[int]
    """Everything reduced over the data-parallel group, in one bucket."""
    shared: list[int]
    """The tied embedding / output copy with PP > 1: dense, but a bucket of its own with the distributed optimizer."""
    expert: list[int]
    """Expert weights (reduced over the expert-data-parallel group, in their own buffer)."""

    def total(self) -> int:
        """All parameter elements of the stage."""
        return sum(self.dense) + sum(self.shared) + sum(self.expert)


def stage_layers(arch: Architecture, pp: int, stage: int) -> range:
    """Megatron's even split: stage i holds layers [i L / PP, (i + 1) L / PP)."""
    per_stage = arch.layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_params(arch: Architecture, tp: int, pp: int, stage: int, ep: int = 1, etp: int = 1,
                 value_head: bool = False) -> StageParams:
    """Sizes of the parameters of stage ``stage`` on one GPU; matrices are [out, in] with /TP on the split one."""
    h, d = arch.hidden, arch.head_dim
    qkv_rows = (arch.heads + 2 * arch.kv_heads) * d // tp
    dense, shared, expert = [], [], []
    first, last = stage == 0, stage == pp - 1
    if first:
        (shared if arch.tied and pp > 1 and not arch.reward_model else dense).append(arch.vocab // tp * h)
    for layer in stage_layers(arch, pp, stage):
        dense += [h, qkv_rows * h]  # input norm [h] (replicated over TP), linear_qkv [(a + 2g) d / TP, h]
        dense += [qkv_rows] if arch.qkv_bias else []  # q/k/v bias [(a + 2g) d / TP]
        dense += [d, d] if arch.qk_norm else []  # q_layernorm, k_layernorm [head_dim] (replicated)
        dense += [h * (arch.heads * d // tp), h]  # linear_proj [h, a d / TP], pre-MLP norm [h]
        if arch.is_moe_layer(layer):
            dense.append(arch.num_experts * h)  # router [E, h] (replicated)
            f = arch.moe_ffn // etp
            expert += [2 * f * h, h * f] * (arch.num_experts // ep)  # per local expert: fc1 [2 f, h], fc2 [h, f]
        else:
            dense += [2 * (arch.ffn // tp) * h, h * (arch.ffn // tp)]  # fc1 [2 ffn / TP, h], fc2 [h, ffn / TP]
    if last:
        dense.append(h)  # final norm
        if arch.reward_model:
            dense += [h] + ([h] if value_head else [])  # reward head [1, h] (+ value head), replicated
        elif not arch.tied:
            dense.append(arch.vocab // tp * h)  # output layer [V / TP, h]
        elif pp > 1:
            shared.append(arch.vocab // tp * h)  # Megatron's copy of the tied embedding on the last stage
    return StageParams(dense, shared, expert)


def _pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def buffer_numel(buckets: list[list[int]], dp: int, distributed_optimizer: bool) -> int:
    """Elements of one DDP buffer holding ``buckets`` of parameter sizes. With the distributed optimizer each
    parameter starts 64-aligned and each bucket ends on a multiple of lcm(DP, 128), so that it shards evenly."""
    if not distributed_optimizer:
        return sum(sum(bucket) for bucket in buckets)
    return sum(_pad(sum(_pad(n, 64) for n in bucket), math.lcm(dp, 128)) for bucket in buckets if bucket)


@dataclass
class TrainedBytes:
    """Weights, gradients and optimizer states of one trained model on one GPU."""

    weights: int
    """The parameters (DDP's padded buffer with the distributed optimizer)."""
    gradients: int
    """DDP's fp32 gradient buffers."""
    optimizer: int
    """Adam moments and fp32 main weights (this rank's shard with the distributed optimizer)."""


def trained_bytes(params: StageParams, layout: MemoryLayout) -> TrainedBytes:
    """Bytes of a DDP-wrapped model with its Megatron optimizer, on one GPU."""
    e = DTYPE_BYTES[layout.dtype]
    if layout.ep > 1:  # expert weights reduce over the expert-data-parallel group, in a buffer of their own
        expert_dp = layout.tp * layout.dp // (layout.ep * layout.etp)
        buffers = [([params.dense, params.shared], layout.dp), ([params.expert], expert_dp)]
    else:  # Megatron-Core marks expert weights as such only with EP > 1: they join the dense buffer
        buffers = [([params.dense + params.expert, params.shared], layout.dp)]
    weights = gradients = optimizer = 0
    per_element = 2 * FP32 + (FP32 if e < FP32 else 0)  # exp_avg, exp_avg_sq (+ fp32 main copy of 16-bit weights)
    for buckets, dp in buffers:
        real = sum(sum(bucket) for bucket in buckets)
        if not real:
            continue
        padded = buffer_numel(buckets, dp, layout.distributed_optimizer)
        weights += padded * e
        gradients += padded * FP32
        # A rank's shard is padded / DP elements of the buffer, of which at most ``real`` are parameters.
        optimizer += (min(real, padded // dp) if layout.distributed_optimizer else real) * per_element
    return TrainedBytes(weights, gradients, optimizer)


def layer_activation_bytes(arch: Architecture, layer: int, layout: MemoryLayout, batch: int) -> int:
    """Bytes one layer saves for backward for ``batch`` sequences of ``layout.sequence`` tokens, on one GPU.

    Per token, with e the weights' dtype bytes and a = heads / TP, g = kv heads / TP, d = head_dim, f = ffn / TP:

    - ``local`` (Megatron-Core's modules; measured on CPU): each RMSNorm (torch's) saves its input upcast to fp32
      and x * rstd in fp32 (8h) and rstd (4), each linear its input (e h, e a d for linear_proj); the unfused
      attention saves q, K and V expanded to all a heads (e a d each, for GQA), the fp32 softmax probabilities
      (4 a s) plus their e-byte copy for the product with V (in bf16), and a causal mask of s^2 bools per layer;
      Qwen3's q/k norms add their fp32 inputs (q a reshaped copy, k a view of the q/k/v output) and x * rstd.
    - ``te`` (Transformer Engine, GPU; not measured here): each fused norm + linear saves its input and the
      normalised input (2 e h) and rstd; flash attention saves q and k after RoPE (e a d, e g d), the q/k/v output
      that V is a view of (e (a + 2g) d), its output (e a d, also linear_proj's input) and the softmax
      log-sum-exp (4 a); no s^2 term.
    - SwiGLU saves fc1's output (2 e f) and fc2's input (e f), fused (GPU); unfused (CPU) also silu(gate) and
      the up half's copy (5 e f in all). A MoE layer instead routes each token to k experts (the alltoall
      dispatcher): per token-expert pair the permuted input, the routing weight and the expert's SwiGLU with the
      weight applied before fc2 (3 e f fused, 6 e f unfused, f = moe_ffn / ETP), plus the router's ids and
      probabilities; balanced routing is assumed (each rank's experts see as many token-expert pairs as its
      tokens send out).
    - RoPE saves cos and sin for q and k: 4 s d e bytes per layer.
    """
    e, s, h, d = DTYPE_BYTES[layout.dtype], layout.sequence, arch.hidden, arch.head_dim
    a, g = arch.heads // layout.tp, arch.kv_heads // layout.tp
    qkv = (a + 2 * g) * d  # elements of the q/k/v projection's output per token
    per_token = 2 * e * h  # inputs of linear_qkv and of fc1 (or the router and dispatcher)
    per_layer = 4 * s * d * e  # RoPE's cos and sin of q and k
    if layout.spec == "local":
        per_token += 2 * (8 * h + FP32)
        qkv_storage_saved = False
        if arch.qk_norm:
            per_token += 4 * (a + g) * d + 4 * (a + g)  # x * rstd in fp32, rstd per head
            # Inputs in fp32: q is a copy (Megatron reshapes it out of the grouped q/k/v output), k a view of that
            # output, so in an fp32 model the k norm keeps the whole q/k/v output.
            qkv_storage_saved = e == FP32
            per_token += 4 * a * d + (4 * qkv if qkv_storage_saved else 4 * g * d)
        per_token += 2 * e * a * d  # q, K expanded to a heads
        # V: expanded to a heads with GQA; without it a view of the q/k/v output (once, if not saved already).
        per_token += e * a * d if g < a else (0 if qkv_storage_saved else e * qkv)
        per_token += s * a * (FP32 + (e if e < FP32 else 0))  # softmax probabilities
        per_token += e * a * d  # linear_proj's input
        per_layer += s * s  # causal mask (bool)
    else:
        per_token += 2 * (e * h + FP32)  # normalised inputs and rstd of the two fused norm + linear
        # q/k norms: rstd, and q's input, a reshaped copy (k's is a view of the q/k/v output, counted below)
        per_token += 4 * (a + g) + e * a * d if arch.qk_norm else 0
        per_token += e * a * d + e * g * d + e * qkv + e * a * d + 4 * a  # q, k, q/k/v output, out, lse
    swiglu = 3 if layout.fused_activation else 5
    if arch.is_moe_layer(layer):
        k, experts = arch.experts_per_token, arch.num_experts
        # Router: top-k ids (three int64 copies), the routing softmax (fp32, over the top-k logits, or over all
        # experts before the top-k), the load-balancing loss's softmax over all experts (fp32), routing map (bool),
        # probabilities map (e). Experts, per token-expert pair: the permuted input, the routing weight, and
        # SwiGLU with the weight applied before fc2 (fused: fc1's output and fc2's input; unfused: 6 e f).
        routing_softmax = k if arch.normalize_top_k else experts
        per_token += 3 * 8 * k + FP32 * (routing_softmax + experts) + experts + e * experts
        per_token += k * (e * h + e + (3 if layout.fused_activation else 6) * e * (arch.moe_ffn // layout.etp))
        per_layer += 8 * experts + FP32  # tokens per expert (int64), the load-balancing loss
    else:
        per_token += swiglu * e * (arch.ffn // layout.tp)
    return batch * s * per_token + per_layer


def stage_activation_bytes(arch: Architecture, layout: MemoryLayout, stage: int, batch: int) -> int:
    """Bytes saved for backward on one GPU of ``stage``: the micro-batches in flight under 1F1B (PP - stage) of
    ``batch`` sequences each, with the embedding's token ids (first stage) and the head (last stage): the final
    norm, the output layer's input and Megatron's vocab-parallel cross entropy (fp32 softmax [b, s - 1, V / TP],
    target mask and ids), or the reward model's fp32 hidden states read by its scalar heads."""
    e, s, h = DTYPE_BYTES[layout.dtype], layout.sequence, arch.hidden
    tokens = batch * s
    layers = stage_layers(arch, layout.pp, stage)
    if layout.recompute:
        per_micro_batch = len(layers) * tokens * e * h  # each layer's input, kept by its checkpoint
    else:
        per_micro_batch = sum(layer_activation_bytes(arch, layer, layout, batch) for layer in layers)
    if stage == 0:
        per_micro_batch += tokens * 8  # int64 token ids
    if stage > 0:
        per_micro_batch += tokens * e * h  # the received input tensor, kept by the schedule
    if stage < layout.pp - 1:
        per_micro_batch += tokens * e * h  # the output tensor sent on, kept until its gradient returns
    if stage == layout.pp - 1:
        per_micro_batch += tokens * ((8 * h + FP32) if layout.spec == "local" else (e * h + FP32))  # final norm
        if arch.reward_model:
            # fp32 hidden states; in bf16 also the reward head's fp32 copy (the value head reads a detached state)
            per_micro_batch += tokens * FP32 * h + (FP32 * h if e < FP32 else 0)
        else:
            per_micro_batch += tokens * e * h + batch * (s - 1) * (FP32 * (arch.vocab // layout.tp) + 1 + 8)
    # With recompute, backward rematerialises one layer at a time on top of the checkpoints.
    rematerialised = max((layer_activation_bytes(arch, layer, layout, batch) for layer in layers), default=0)
    return (layout.pp - stage) * per_micro_batch + (rematerialised if layout.recompute else 0)


def rollout_bytes(policy: Architecture, layout: MemoryLayout, stage: int) -> tuple[int, int]:
    """(the engine's weights, its KV cache) on the most loaded GPU of ``stage``; KV holds keys and values of
    every layer the engine runs: 2 x layers x kv heads x head_dim x (prompt + response) x rollout_batch x e.

    - transformers: one full HF copy of the policy and its whole-model KV cache on the first GPU of each
      model-parallel group (stage 0), fed by weight sync.
    - vllm: an engine on every GPU with vLLM's tensor parallelism = TP (experts split by TP as well): weights
      and KV heads / TP (at least one head: vLLM replicates KV heads beyond their count), all layers; with
      ``vllm_kv_cache_bytes`` the cache is what the engine reserves instead.
    - megatron: samples from the sharded policy itself (no copy); static KV cache of the stage's layers with
      kv heads / TP.
    """
    e, kv_tokens = DTYPE_BYTES[layout.dtype], layout.sequence * layout.rollout_batch
    d, g = policy.head_dim, policy.kv_heads
    if layout.rollout_backend == "transformers":
        if stage != 0:
            return 0, 0
        return stage_params(policy, 1, 1, 0).total() * e, 2 * policy.layers * g * d * kv_tokens * e
    if layout.rollout_backend == "vllm":
        weights = stage_params(policy, layout.tp, 1, 0, etp=layout.tp).total() * e
        if layout.vllm_kv_cache_bytes is not None:
            return weights, layout.vllm_kv_cache_bytes
        return weights, 2 * policy.layers * max(1, g // layout.tp) * d * kv_tokens * e
    layers = len(stage_layers(policy, layout.pp, stage))
    return 0, 2 * layers * (g // layout.tp) * d * kv_tokens * e


def stage_bytes(policy: Architecture, reward: Architecture, layout: MemoryLayout, stage: int) -> dict[str, int]:
    """The parts of one GPU of pipeline stage ``stage`` (without the total)."""
    e = DTYPE_BYTES[layout.dtype]
    shape = dict(tp=layout.tp, pp=layout.pp, stage=stage, ep=layout.ep, etp=layout.etp)
    policy_params = stage_params(policy, **shape)
    reward_params = stage_params(reward, **shape, value_head=layout.value_head)
    parts, offloaded = {}, [0]
    for name, params, trained, batch in (("policy", policy_params, True, layout.micro_batch),
                                         ("reward", reward_params, layout.reward_trained, layout.reward_micro_batch)):
        arch = policy if name == "policy" else reward
        if trained:
            state = trained_bytes(params, layout)
            idle = (state.optimizer if layout.offload_optimizer else 0) + (
                state.gradients if layout.offload_gradients else 0)
            offloaded.append(idle)
            parts[f"{name}_weights"] = state.weights
            parts[f"{name}_gradients"] = 0 if layout.offload_gradients else state.gradients
            parts[f"{name}_optimizer_states"] = 0 if layout.offload_optimizer else state.optimizer
            parts[f"{name}_activations"] = stage_activation_bytes(arch, layout, stage, batch)
        else:
            parts.update({f"{name}_weights": params.total() * e, f"{name}_gradients": 0,
                          f"{name}_optimizer_states": 0, f"{name}_activations": 0})
        if name == "policy":
            reference = policy_params.total() * e if layout.reference else 0
            offloaded.append(reference if layout.offload_reference else 0)
            parts["reference_weights"] = 0 if layout.offload_reference else reference
    weights, kv_cache = rollout_bytes(policy, layout, stage)
    if layout.rollout_backend != "megatron":
        parts["rollout_weights"] = weights
    parts["rollout_kv_cache"] = kv_cache
    if layout.offload_optimizer or layout.offload_gradients or layout.offload_reference:
        # What is offloaded comes back for its own phase (a model's update, the reference's log-probs): the
        # largest such block is on the GPU at the worst moment.
        parts["offload_restored"] = max(offloaded)
    return parts


def layout_problems(arch: Architecture, layout: MemoryLayout) -> list[str]:
    """What keeps ``layout`` from splitting ``arch``, one message per problem (the checks of
    ``megatron_save.distributed.init.check_parallel_layout``, plus the MLP widths Megatron's linears divide)."""
    named = f"{arch.source}: " if arch.source else ""
    problems = [f"{named}tensor_model_parallel_size={layout.tp} does not divide the {count} {what}"
                for count, what in ((arch.heads, "attention heads"), (arch.kv_heads, "query groups (key/value heads)"),
                                    (arch.vocab, "vocabulary entries"), (arch.ffn, "intermediate (ffn) channels"))
                if count % layout.tp]
    if arch.layers % layout.pp:
        problems.append(f"{named}pipeline_model_parallel_size={layout.pp} does not divide the {arch.layers} layers")
    if arch.num_experts:
        if arch.num_experts % layout.ep:
            problems.append(f"{named}expert_model_parallel_size={layout.ep} does not divide the "
                            f"{arch.num_experts} experts")
        if arch.moe_ffn % layout.etp:
            problems.append(f"{named}expert_tensor_parallel_size={layout.etp} does not divide "
                            f"moe_intermediate_size={arch.moe_ffn}")
        if (layout.tp * layout.dp) % (layout.ep * layout.etp):
            problems.append(f"{named}expert_model_parallel_size x expert_tensor_parallel_size = "
                            f"{layout.ep} x {layout.etp} does not divide TP x DP = {layout.tp} x {layout.dp}")
    return problems


def plan_memory(policy: Architecture, reward: Architecture, layout: MemoryLayout) -> MemoryPlan:
    """Per-GPU bytes of ``layout``: the parts of the pipeline stage whose total is largest (ValueError naming
    every problem when the layout cannot split a model)."""
    if layout.dtype not in DTYPE_BYTES or layout.rollout_backend not in ROLLOUT_BACKENDS or layout.spec not in SPECS:
        raise ValueError(f"dtype={layout.dtype!r}, rollout_backend={layout.rollout_backend!r}, spec={layout.spec!r}: "
                         f"choose from {sorted(DTYPE_BYTES)}, {ROLLOUT_BACKENDS}, {SPECS}")
    if policy.reward_model or not reward.reward_model:
        raise ValueError("the policy must be a causal LM and the reward model carry the scalar head")
    problems = layout_problems(policy, layout) + layout_problems(reward, layout)
    if problems:
        raise ValueError("; ".join(problems))
    stages = [stage_bytes(policy, reward, layout, stage) for stage in range(layout.pp)]
    stage = max(range(layout.pp), key=lambda i: sum(stages[i].values()))
    return MemoryPlan({**stages[stage], "total": sum(stages[stage].values())}, stage, layout)


def candidate_layouts(policy: Architecture, reward: Architecture, gpus: int, base: MemoryLayout,
                      max_tp: int = 8) -> list[MemoryLayout]:
    """Every TP x PP x DP = ``gpus`` layout both models split (TP a power of two up to ``max_tp``, PP dividing
    the layers, EP a power of two dividing the experts of the MoE models), with ``base``'s other settings;
    ordered by model-parallel size TP x PP x EP."""
    experts = [arch.num_experts for arch in (policy, reward) if arch.num_experts]
    found = []
    for tp in (size for size in (1, 2, 4, 8) if size <= max_tp):
        for pp in range(1, gpus // tp + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            eps = [ep for ep in (2 ** i for i in range(12)) if ep <= min(experts)] if experts else [1]
            for ep in eps:
                layout = replace(base, tp=tp, pp=pp, dp=dp, ep=ep)
                if not layout_problems(policy, layout) + layout_problems(reward, layout):
                    found.append(layout)
    return sorted(found, key=lambda layout: (layout.tp * layout.pp * layout.ep, layout.tp, layout.pp, layout.ep))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80 * 10^9, '80GiB' -> 80 * 2^30, '1234' -> 1234 bytes (units are case-insensitive)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, "
                         "MiB, GiB, TiB), e.g. 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
