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
- Activations: the bytes saved for backward by one micro-batch (``micro_batch`` sequences, or a token budget's
  worth), times the micro-batches in flight on a stage under the 1F1B schedule (PP - stage), with Megatron-Core's
  recompute where it is set. See ``layer_activation_bytes`` and ``stage_activations``.
- Forwards without backward (log-probs, RM scoring): see ``forward_bytes``.
- Rollout: the engine's own copy of the policy's weights and its KV cache (see ``rollout_bytes``).

``plan_memory`` gives the peak of each phase of a step (``stage_phases``: rollout, log-probs, RM scoring, RM update,
policy update), holding what ``trainers/offload.py`` leaves resident plus what the phase brings back; the run's
peak is the largest. The all-resident total (every part at once, as if nothing were ever freed) stays beside it.
``search_fits`` looks for the cheapest recompute / token-budget / offload settings and TP / PP / EP layouts that
fit a budget (``settings_cost`` says what cheapest means). Not counted: the CUDA context, NCCL buffers, transient
workspace of the updates and fragmentation (the launch check's ``memory_check.margin_gib``); sequence parallelism's split
of the activations (the plan is an upper bound where it is on).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
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


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class Recompute:
    """Megatron-Core's activation recompute of one trained model (the numbers of ``RecomputeSettings``)."""

    granularity: str | None = None
    """None (every activation kept), full (whole layers recomputed in the backward) or selective (core attention
    recomputed)."""
    method: str = "uniform"
    """full: uniform (chunks of ``num_layers`` layers, each keeping only its input) or block (the first
    ``num_layers`` layers of each pipeline stage recomputed one by one, the rest keep everything)."""
    num_layers: int = 1
    """full: layers per chunk (uniform) or layers recomputed on each stage (block)."""

    def __str__(self) -> str:
        if self.granularity != "full":
            return str(self.granularity or "none")
        return f"full/{self.method}/{self.num_layers}"


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
    policy_recompute: Recompute = field(default_factory=lambda: Recompute())
    """The policy's activation recompute (``policy.recompute``)."""
    reward_recompute: Recompute = field(default_factory=lambda: Recompute())
    """The reward model's activation recompute (``reward.recompute``)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of a policy micro-batch, padding included (``policy.max_tokens_per_micro_batch``; 0: fixed
    micro-batches of ``micro_batch`` sequences)."""
    rows_per_example: int = 1
    """Rows a token-budget micro-batch keeps together (stage 1: a chosen / rejected pair): the smallest budget is
    this many full-length sequences."""
    reward_max_tokens_per_micro_batch: int = 0
    """Token budget of a reward-model micro-batch (``reward.max_tokens_per_micro_batch``; 0: fixed micro-batches
    of ``reward_micro_batch`` sequences)."""
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
    vllm_sleep: bool = True
    """rollout.backend=vllm: the engine sleeps between rollouts (weights to host memory, KV cache freed;
    ``rollout.vllm.sleep_between_rollouts``), so it holds nothing outside the rollout phase."""
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


PHASES = ("rollout", "logprobs", "rm_scoring", "rm_update", "policy_update")
"""The phases of a stage-3 step in order: generation; the reference's and the old policy's log-probs; the reward
model's scoring forward; its update; the policy's update."""


@dataclass(frozen=True)
class PhasePlan:
    """Bytes one GPU holds at the peak of one phase of a step."""

    name: str
    """A name of ``PHASES`` (stage 3), or ``update`` / ``scoring`` for a stage that trains one model."""
    parts: dict[str, int]
    """``<model>_<part>`` -> bytes on one GPU of ``stage`` during this phase."""
    stage: int = 0
    """The pipeline stage whose GPUs hold the most in this phase."""

    @property
    def total(self) -> int:
        """The phase's peak: the sum of its parts."""
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    """Per-GPU bytes of a layout: each phase's peak, and every part counted resident at once."""

    per_gpu_bytes: dict[str, int] = field(default_factory=dict)
    """All-resident: ``<model>_<part>`` -> bytes on one GPU of the fullest stage, and ``total``, their sum (an
    upper bound that ignores when each part is live)."""
    stage: int = 0
    """The pipeline stage the all-resident bytes are of."""
    layout: MemoryLayout = field(default_factory=MemoryLayout)
    """What was planned."""
    phases: list[PhasePlan] = field(default_factory=list)
    """Each phase's peak, in the order the step runs them."""

    @property
    def total(self) -> int:
        """The all-resident total."""
        return self.per_gpu_bytes["total"]

    @property
    def peak_phase(self) -> PhasePlan:
        """The phase that holds the most: the run's peak."""
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def peak(self) -> int:
        """The run's peak bytes per GPU (the largest phase)."""
        return self.peak_phase.total


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


def layer_activation_bytes(arch: Architecture, layer: int, layout: MemoryLayout, batch: float,
                           selective: bool = False) -> int:
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

    ``selective`` (Megatron's selective recompute of core attention): the core attention's own tensors (q and K
    expanded to a heads, V, the softmax probabilities, the causal mask; TE: its output's log-sum-exp) are not
    kept; its checkpoint keeps its inputs instead: q and k after RoPE (e a d, e g d) and V, a view of the q/k/v
    output (e (a + 2g) d, once) -- see ``core_attention_bytes`` for what the backward rematerialises.
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
        if selective:
            per_token += e * a * d + e * g * d + (0 if qkv_storage_saved else e * qkv)  # checkpoint's q, k, V
            per_layer += 4  # the checkpoint's int32 attention-mask type
        else:
            per_token += core_attention_bytes(arch, layout, 1, qkv_storage_saved) // s
            per_layer += s * s  # causal mask (bool)
        per_token += e * a * d  # linear_proj's input
    else:
        per_token += 2 * (e * h + FP32)  # normalised inputs and rstd of the two fused norm + linear
        # q/k norms: rstd, and q's input, a reshaped copy (k's is a view of the q/k/v output, counted below)
        per_token += 4 * (a + g) + e * a * d if arch.qk_norm else 0
        per_token += e * a * d + e * g * d + e * qkv + e * a * d  # q, k, q/k/v output, out
        per_token += 0 if selective else 4 * a  # the softmax's log-sum-exp
        per_layer += 4 if selective else 0  # the checkpoint's int32 attention-mask type
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
    return int(batch * s * per_token) + per_layer


def core_attention_bytes(arch: Architecture, layout: MemoryLayout, batch: float,
                         qkv_storage_saved: bool = False) -> int:
    """What the local spec's unfused core attention saves for ``batch`` sequences: q and K expanded to a heads
    (e a d each), V (expanded with GQA, else the q/k/v output it is a view of, unless the k norm keeps that
    already), the fp32 softmax probabilities and their e-byte copy (4 a s + e a s per token) and the causal mask
    (s^2 bools). Under selective recompute this is what the backward rematerialises, one layer at a time. The TE
    spec's flash attention keeps no s^2 term: only its log-sum-exp (4 a per token)."""
    e, s, d = DTYPE_BYTES[layout.dtype], layout.sequence, arch.head_dim
    a, g = arch.heads // layout.tp, arch.kv_heads // layout.tp
    if layout.spec != "local":
        return int(batch * s * 4 * a)
    per_token = 2 * e * a * d
    per_token += e * a * d if g < a else (0 if qkv_storage_saved else e * (a + 2 * g) * d)
    per_token += s * a * (FP32 + (e if e < FP32 else 0))
    return int(batch * s * per_token)


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one trained model on one GPU of a pipeline stage during its update."""

    saved: int
    """Saved for backward by the micro-batches in flight (with recompute: the checkpoints' inputs)."""
    rematerialised: int
    """What the backward recomputes and holds at once on top of ``saved`` (0 without recompute)."""

    @property
    def total(self) -> int:
        """The update's activation peak."""
        return self.saved + self.rematerialised


def micro_batch_sequences(layout: MemoryLayout, batch: int, max_tokens: int) -> float:
    """Full-length sequences a micro-batch's activations are bounded by: ``batch``, or with a token budget
    ``max_tokens`` / sequence (a micro-batch's rows x its longest row is at most the budget, so its per-token
    bytes are at most the budget's and its s^2 terms at most budget x sequence)."""
    if not max_tokens:
        return batch
    if max_tokens < layout.sequence:
        raise ValueError(f"a token budget of {max_tokens} per micro-batch is below one full-length sequence of "
                         f"{layout.sequence} tokens (prompt {layout.prompt_length} + response "
                         f"{layout.response_length}): a row longer than the budget cannot run")
    if max_tokens < layout.rows_per_example * layout.sequence:
        raise ValueError(f"a token budget of {max_tokens} per micro-batch is below {layout.rows_per_example} "
                         f"full-length sequences of {layout.sequence} tokens, the rows an example keeps together")
    return max_tokens / layout.sequence


def recompute_problems(recompute: Recompute, layers_per_stage: int, name: str) -> list[str]:
    """What keeps ``recompute`` from running on stages of ``layers_per_stage`` layers (``name``: the setting)."""
    if recompute.granularity is None:
        return []
    if recompute.granularity not in RECOMPUTE_GRANULARITIES or recompute.method not in RECOMPUTE_METHODS:
        return [f"{name}: granularity {recompute.granularity!r} / method {recompute.method!r}: choose from "
                f"{RECOMPUTE_GRANULARITIES} / {RECOMPUTE_METHODS}"]
    if recompute.granularity == "full" and not 1 <= recompute.num_layers <= layers_per_stage:
        return [f"{name}: num_layers={recompute.num_layers} is not within the {layers_per_stage} layers of a stage"]
    if recompute.granularity == "full" and recompute.method == "uniform" and layers_per_stage % recompute.num_layers:
        return [f"{name}: num_layers={recompute.num_layers} does not divide the {layers_per_stage} layers of a stage"]
    return []


def stage_activations(arch: Architecture, layout: MemoryLayout, stage: int, batch: float,
                      recompute: Recompute = Recompute()) -> ActivationBytes:
    """Activation bytes on one GPU of ``stage``: the micro-batches in flight under 1F1B (PP - stage) of ``batch``
    sequences each, with the embedding's token ids (first stage) and the head (last stage): the final norm, the
    output layer's input and Megatron's vocab-parallel cross entropy (fp32 softmax [b, s - 1, V / TP], target
    mask and ids), or the reward model's fp32 hidden states read by its scalar heads.

    Recompute (Megatron-Core's ``transformer_block._checkpointed_forward``): full / uniform keeps the input of
    each chunk of ``num_layers`` layers ([s, b, h], e bytes) and the rotary table it passes (fp32 [s, d], one
    storage for all layers), and the backward rematerialises one chunk; full / block checkpoints the first
    ``num_layers`` layers one by one and keeps the rest, rematerialising one layer; selective keeps core
    attention's inputs and rematerialises one layer's core attention."""
    e, s, h = DTYPE_BYTES[layout.dtype], layout.sequence, arch.hidden
    tokens = batch * s
    layers = list(stage_layers(arch, layout.pp, stage))
    selective = recompute.granularity == "selective"
    by_kind: dict[bool, int] = {}  # a layer's bytes depend on its index only through its kind (MoE or dense)
    for layer in layers:
        if arch.is_moe_layer(layer) not in by_kind:
            by_kind[arch.is_moe_layer(layer)] = layer_activation_bytes(arch, layer, layout, batch, selective)
    full = [by_kind[arch.is_moe_layer(layer)] for layer in layers]
    rematerialised = 0
    if recompute.granularity == "full":
        n = recompute.num_layers
        if recompute.method == "uniform":
            chunks = -(-len(layers) // n)
            per_micro_batch = chunks * int(tokens * e * h) + FP32 * s * arch.head_dim
            rematerialised = max((sum(full[i:i + n]) for i in range(0, len(layers), n)), default=0)
        else:
            per_micro_batch = n * int(tokens * e * h) + FP32 * s * arch.head_dim + sum(full[n:])
            rematerialised = max(full[:n], default=0)
    else:
        per_micro_batch = sum(full)
        if selective and layers:
            rematerialised = core_attention_bytes(arch, layout, batch) + (s * s if layout.spec == "local" else 0)
    if stage == 0:
        per_micro_batch += int(tokens * 8)  # int64 token ids
    if stage > 0:
        per_micro_batch += int(tokens * e * h)  # the received input tensor, kept by the schedule
    if stage < layout.pp - 1:
        per_micro_batch += int(tokens * e * h)  # the output tensor sent on, kept until its gradient returns
    if stage == layout.pp - 1:
        per_micro_batch += int(tokens * ((8 * h + FP32) if layout.spec == "local" else (e * h + FP32)))  # final norm
        if arch.reward_model:
            # fp32 hidden states; in bf16 also the reward head's fp32 copy (the value head reads a detached state)
            per_micro_batch += int(tokens * FP32 * h) + (FP32 * h if e < FP32 else 0)
        else:
            per_micro_batch += int(tokens * e * h + batch * (s - 1) * (FP32 * (arch.vocab // layout.tp) + 1 + 8))
    return ActivationBytes((layout.pp - stage) * per_micro_batch, rematerialised)


def stage_activation_bytes(arch: Architecture, layout: MemoryLayout, stage: int, batch: float,
                           recompute: Recompute = Recompute()) -> int:
    """The update's activation peak on one GPU of ``stage`` (``stage_activations``: saved + rematerialised)."""
    return stage_activations(arch, layout, stage, batch, recompute).total


def forward_bytes(arch: Architecture, layout: MemoryLayout, stage: int, batch: float) -> int:
    """The peak of a forward without backward (log-probs, RM scoring) for one micro-batch on ``stage``: the
    [s, b, h] stream between layers, plus the larger of one layer's working set (bounded by what that layer
    would save for backward, ``layer_activation_bytes``: its intermediates are freed as it runs) and, on the last
    stage, the head's: the policy's logits [b, s, V / TP] (e bytes) with the four fp32 tensors that
    ``models.policy``'s log-prob and entropy hold at once, or the reward model's fp32 final hidden states."""
    e, tokens = DTYPE_BYTES[layout.dtype], batch * layout.sequence
    kinds = {arch.is_moe_layer(layer): layer for layer in stage_layers(arch, layout.pp, stage)}
    layer = max((layer_activation_bytes(arch, index, layout, batch) for index in kinds.values()), default=0)
    head = 0
    if stage == layout.pp - 1:
        per_token = FP32 * arch.hidden if arch.reward_model else (arch.vocab // layout.tp) * (e + 4 * FP32)
        head = int(tokens * per_token)
    return int(tokens * e * arch.hidden) + max(layer, head)


def r2m_feedback_bytes(policy: Architecture, sequences: int, tokens: int) -> int:
    """R2M's feedback (trainers/stage3/r2m.py), which the phase plan leaves out: the policy's last-layer hidden
    states of ``sequences`` responses of up to ``tokens`` tokens, fp32 [N, S, H], held on every rank for its head's
    forward and update."""
    return sequences * tokens * policy.hidden * FP32


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


@dataclass(frozen=True)
class ModelBytes:
    """One model's bytes on one GPU of a pipeline stage."""

    weights: int
    """Its parameters (DDP's padded buffer for a trained model with the distributed optimizer)."""
    gradients: int
    """DDP's fp32 gradient buffers (0 when frozen)."""
    optimizer: int
    """Adam moments and fp32 main weights (0 when frozen)."""
    activations: ActivationBytes
    """Its update's activations (none when frozen)."""
    forward: int
    """What a forward without backward holds for one micro-batch (``forward_bytes``)."""


@lru_cache(maxsize=4096)
def _state_bytes(arch: Architecture, tp: int, pp: int, stage: int, ep: int, etp: int, value_head: bool,
                 dp: int, dtype: str, distributed_optimizer: bool, trained: bool) -> TrainedBytes:
    """trained_bytes (or the bare weights of a frozen model), cached: the layout search plans thousands of
    variants of the same shapes."""
    params = stage_params(arch, tp, pp, stage, ep, etp, value_head)
    if not trained:
        return TrainedBytes(params.total() * DTYPE_BYTES[dtype], 0, 0)
    layout = MemoryLayout(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, dtype=dtype,
                          distributed_optimizer=distributed_optimizer)
    return trained_bytes(params, layout)


def model_bytes(arch: Architecture, layout: MemoryLayout, stage: int, trained: bool, batch: int, max_tokens: int,
                recompute: Recompute, value_head: bool = False) -> ModelBytes:
    """The parts of one model on one GPU of ``stage``; ``batch`` sequences per micro-batch unless ``max_tokens``
    sets a token budget."""
    state = _state_bytes(arch, layout.tp, layout.pp, stage, layout.ep, layout.etp, value_head, layout.dp,
                         layout.dtype, layout.distributed_optimizer, trained)
    sequences = micro_batch_sequences(layout, batch, max_tokens)
    activations = stage_activations(arch, layout, stage, sequences, recompute) if trained else ActivationBytes(0, 0)
    return ModelBytes(state.weights, state.gradients, state.optimizer, activations,
                      forward_bytes(arch, layout, stage, sequences))


def _policy_and_reward(policy: Architecture, reward: Architecture, layout: MemoryLayout,
                       stage: int) -> tuple[ModelBytes, ModelBytes, int]:
    """(the policy's, the reward model's bytes, the reference's weights) on one GPU of ``stage``."""
    p = model_bytes(policy, layout, stage, True, layout.micro_batch, layout.max_tokens_per_micro_batch,
                    layout.policy_recompute)
    r = model_bytes(reward, layout, stage, layout.reward_trained, layout.reward_micro_batch,
                    layout.reward_max_tokens_per_micro_batch, layout.reward_recompute, layout.value_head)
    reference = _state_bytes(policy, layout.tp, layout.pp, stage, layout.ep, layout.etp, False, layout.dp,
                             layout.dtype, False, False).weights if layout.reference else 0
    return p, r, reference


def stage_bytes(policy: Architecture, reward: Architecture, layout: MemoryLayout, stage: int) -> dict[str, int]:
    """All-resident: the parts of one GPU of pipeline stage ``stage`` (without the total), every part counted at
    once (what is offloaded leaves; the largest offloaded block comes back as ``offload_restored``)."""
    p, r, reference = _policy_and_reward(policy, reward, layout, stage)
    parts, offloaded = {}, [0]
    for name, model, trained in (("policy", p, True), ("reward", r, layout.reward_trained)):
        offloaded.append((model.optimizer if layout.offload_optimizer else 0)
                         + (model.gradients if layout.offload_gradients else 0))
        parts[f"{name}_weights"] = model.weights
        parts[f"{name}_gradients"] = 0 if layout.offload_gradients else model.gradients
        parts[f"{name}_optimizer_states"] = 0 if layout.offload_optimizer else model.optimizer
        parts[f"{name}_activations"] = model.activations.total
        if name == "policy":
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


def stage_phases(policy: Architecture, reward: Architecture, layout: MemoryLayout, stage: int) -> list[PhasePlan]:
    """The peak of each phase of a stage-3 step on one GPU of ``stage``, following ``trainers/offload.py``:
    between phases every model's weights stay, and its gradient buffers and optimizer states unless
    ``offload.gradients`` / ``offload.optimizer`` move them off; the reference's weights stay unless
    ``offload.reference``. Each phase brings back what it uses (``IdleOffload.resident``):

    - rollout: the engine's weights and KV cache (the transformers engine's copy stays between rollouts, vLLM's
      sleeps unless ``vllm_sleep`` is off: then its weights and reserved cache stay too);
    - logprobs: the reference's weights, one policy micro-batch's forward (reference and old log-probs);
    - rm_scoring: one reward micro-batch's forward;
    - rm_update (trained RM): its gradients, optimizer states and activations (with recompute what the backward
      rematerialises on top);
    - policy_update: the same for the policy.
    """
    p, r, reference = _policy_and_reward(policy, reward, layout, stage)
    engine_weights, kv_cache = rollout_bytes(policy, layout, stage)
    engine_stays = layout.rollout_backend == "transformers" or (layout.rollout_backend == "vllm" and
                                                                not layout.vllm_sleep)
    resident = {}
    for name, model in (("policy", p), ("reward", r)):
        resident[f"{name}_weights"] = model.weights
        resident[f"{name}_gradients"] = 0 if layout.offload_gradients else model.gradients
        resident[f"{name}_optimizer_states"] = 0 if layout.offload_optimizer else model.optimizer
    resident["reference_weights"] = 0 if layout.offload_reference else reference
    resident["rollout_weights"] = engine_weights if engine_stays else 0
    resident["rollout_kv_cache"] = kv_cache if layout.rollout_backend == "vllm" and not layout.vllm_sleep else 0

    def phase(name: str, **changes: int) -> PhasePlan:
        return PhasePlan(name, {**resident, **changes}, stage)

    phases = [phase("rollout", rollout_weights=engine_weights, rollout_kv_cache=kv_cache),
              phase("logprobs", reference_weights=reference, policy_forward=p.forward),
              phase("rm_scoring", reward_forward=r.forward)]
    if layout.reward_trained:
        phases.append(phase("rm_update", reward_gradients=r.gradients, reward_optimizer_states=r.optimizer,
                            reward_activations=r.activations.saved, reward_recomputed=r.activations.rematerialised))
    phases.append(phase("policy_update", policy_gradients=p.gradients, policy_optimizer_states=p.optimizer,
                        policy_activations=p.activations.saved, policy_recomputed=p.activations.rematerialised))
    return phases


def fullest_phases(stages: list[list[PhasePlan]]) -> list[PhasePlan]:
    """Each phase at the stage whose GPUs hold the most in it (``stages[i]``: stage i's phases)."""
    return [max(column, key=lambda phase: phase.total) for column in zip(*stages)]


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
    """Per-GPU bytes of ``layout``: each phase's peak (``stage_phases``) and the all-resident parts of the
    pipeline stage whose total is largest (ValueError naming every problem when the layout cannot run)."""
    if layout.dtype not in DTYPE_BYTES or layout.rollout_backend not in ROLLOUT_BACKENDS or layout.spec not in SPECS:
        raise ValueError(f"dtype={layout.dtype!r}, rollout_backend={layout.rollout_backend!r}, spec={layout.spec!r}: "
                         f"choose from {sorted(DTYPE_BYTES)}, {ROLLOUT_BACKENDS}, {SPECS}")
    if policy.reward_model or not reward.reward_model:
        raise ValueError("the policy must be a causal LM and the reward model carry the scalar head")
    problems = layout_problems(policy, layout) + layout_problems(reward, layout)
    problems += recompute_problems(layout.policy_recompute, policy.layers // layout.pp, "policy.recompute")
    problems += recompute_problems(layout.reward_recompute, reward.layers // layout.pp, "reward.recompute")
    if problems:
        raise ValueError("; ".join(problems))
    stages = [stage_bytes(policy, reward, layout, stage) for stage in range(layout.pp)]
    stage = max(range(layout.pp), key=lambda i: sum(stages[i].values()))
    phases = fullest_phases([stage_phases(policy, reward, layout, i) for i in range(layout.pp)])
    return MemoryPlan({**stages[stage], "total": sum(stages[stage].values())}, stage, layout, phases)


def plan_training(model: Architecture, layout: MemoryLayout, backbone_trained: bool = True) -> MemoryPlan:
    """Per-GPU bytes of a stage that trains one model (stage 1, stage 2, SFT), planned with ``layout``'s policy
    fields (micro_batch, max_tokens_per_micro_batch, policy_recompute) and ``prompt_length`` + ``response_length``
    as the longest sequence. ``backbone_trained`` false: stage 2, where only the value head learns; at PP = 1 the
    backbone is frozen (the head's gradients and optimizer states are a few kilobytes, the backbone's forward keeps
    nothing for a backward); at PP > 1 it trains at a learning rate of zero (Megatron's schedule sends gradients
    between stages), so it is planned as trained: gradients, optimizer states and activations."""
    problems = layout_problems(model, layout) + recompute_problems(layout.policy_recompute,
                                                                   model.layers // layout.pp, "recompute")
    if problems:
        raise ValueError("; ".join(problems))
    name = "reward" if model.reward_model else "policy"
    trained = backbone_trained or layout.pp > 1  # as build_train_state trains it
    stages = []
    for stage in range(layout.pp):
        m = model_bytes(model, layout, stage, trained, layout.micro_batch, layout.max_tokens_per_micro_batch,
                        layout.policy_recompute, layout.value_head)
        if trained:
            parts = {f"{name}_weights": m.weights, f"{name}_gradients": m.gradients,
                     f"{name}_optimizer_states": m.optimizer, f"{name}_activations": m.activations.saved,
                     f"{name}_recomputed": m.activations.rematerialised}
        else:
            head = model.hidden * (1 + layout.value_head) if stage == layout.pp - 1 else 0
            parts = {f"{name}_weights": m.weights, f"{name}_gradients": head * FP32,
                     f"{name}_optimizer_states": head * 3 * FP32, f"{name}_forward": m.forward}
        stages.append([PhasePlan("update", parts, stage)])
    phases = fullest_phases(stages)
    return MemoryPlan({**phases[0].parts, "total": phases[0].total}, phases[0].stage, layout, phases)


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


GIB = 2**30
KNOBS = ("policy_recompute", "reward_recompute", "max_tokens_per_micro_batch", "reward_max_tokens_per_micro_batch",
         "offload_gradients", "offload_reference", "offload_optimizer")
"""The settings the search varies (MemoryLayout fields), besides the parallel layout."""
STAGE3_SETTINGS = {"policy_recompute": "policy.recompute.granularity", "reward_recompute": "reward.recompute.granularity",
                   "max_tokens_per_micro_batch": "policy.max_tokens_per_micro_batch",
                   "reward_max_tokens_per_micro_batch": "reward.max_tokens_per_micro_batch",
                   "offload_gradients": "offload.gradients", "offload_reference": "offload.reference",
                   "offload_optimizer": "offload.optimizer", "tp": "parallel.tensor_model_parallel_size",
                   "pp": "parallel.pipeline_model_parallel_size", "ep": "parallel.expert_model_parallel_size"}
"""MemoryLayout field -> the stage-3 config setting it stands for, as a refusal names it."""
TRAINING_SETTINGS = {"policy_recompute": "recompute.granularity",
                     "max_tokens_per_micro_batch": "batch.max_tokens_per_micro_batch",
                     "tp": "parallel.tensor_model_parallel_size", "pp": "parallel.pipeline_model_parallel_size",
                     "ep": "parallel.expert_model_parallel_size"}
"""The same for stage 1, stage 2 and SFT (one trained model, planned through the policy fields)."""


def settings_cost(layout: MemoryLayout) -> tuple:
    """Sort key of the search, cheapest first, by what each setting costs in step time:

    1. full recompute, per model: it runs every layer's forward again in the backward, about a third more of
       that model's update compute, the most of any setting;
    2. the model-parallel size TP x PP x EP: every doubling adds communication to every layer (TP, EP) or
       pipeline bubbles (PP), and halves the data-parallel replicas that share the rollouts;
    3. offload.optimizer: 12 bytes a parameter cross PCIe both ways in every step;
    4. selective recompute, per model: core attention's forward again, a few percent;
    5. offload.gradients (the buffers are freed and zeroed again, no copy) and offload.reference (its weights
       cross PCIe once a step);
    6. token budgets: they only regroup the rows of a micro-batch (less padding, often faster); a larger budget
       before a smaller one (fewer micro-batches).
    """
    recompute = (layout.policy_recompute.granularity, layout.reward_recompute.granularity)
    budgets = [b for b in (layout.max_tokens_per_micro_batch, layout.reward_max_tokens_per_micro_batch) if b]
    return (recompute.count("full"), layout.tp * layout.pp * layout.ep, layout.offload_optimizer,
            recompute.count("selective"), layout.offload_gradients + layout.offload_reference, len(budgets),
            -sum(budgets), layout.tp, layout.pp)


def _budgets(layout: MemoryLayout, batch: int) -> list[int]:
    """Token budgets worth trying for micro-batches of ``batch`` full-length sequences: none, then the rows of an
    example x sequence x 2^k below batch x sequence (a budget of a whole micro-batch or more changes nothing)."""
    found, budget = [0], layout.rows_per_example * layout.sequence
    while budget < batch * layout.sequence:
        found.append(budget)
        budget *= 2
    return found


def setting_variants(base: MemoryLayout, knobs: tuple[str, ...] = KNOBS) -> list[MemoryLayout]:
    """Every combination of ``knobs`` on ``base`` (recompute: none, selective, full / uniform / 1; budgets: see
    ``_budgets``; offload: off, on), cheapest first by ``settings_cost``."""
    choices = {
        "policy_recompute": [Recompute(), Recompute("selective"), Recompute("full")],
        "reward_recompute": [Recompute(), Recompute("selective"), Recompute("full")],
        "max_tokens_per_micro_batch": _budgets(base, base.micro_batch),
        "reward_max_tokens_per_micro_batch": _budgets(base, base.reward_micro_batch),
        "offload_gradients": [False, True], "offload_reference": [False, True], "offload_optimizer": [False, True]}
    variants = [base]
    for knob in knobs:
        variants = [replace(variant, **{knob: value}) for variant in variants for value in choices[knob]]
    return sorted(set(variants), key=settings_cost)


def search_fits(plan_of, layouts: list[MemoryLayout], budget: int, knobs: tuple[str, ...] = KNOBS,
                per_layout: int = 1) -> list[MemoryPlan]:
    """For each parallel layout of ``layouts``, the ``per_layout`` cheapest variants of ``knobs``
    (``setting_variants``) whose peak is at most ``budget`` bytes; all of them cheapest first.
    ``plan_of(layout)`` plans one (``plan_memory`` with the models bound, or ``plan_training``); a variant it
    refuses (ValueError, e.g. a token budget below one sequence) is skipped."""
    found = []
    for layout in layouts:
        fits = 0
        for variant in setting_variants(layout, knobs):
            try:
                plan = plan_of(variant)
            except ValueError:
                continue
            if plan.peak <= budget:
                found.append(plan)
                fits += 1
                if fits == per_layout:
                    break
    return sorted(found, key=lambda plan: (settings_cost(plan.layout), plan.peak))


def changed_settings(base: MemoryLayout, layout: MemoryLayout, names: dict[str, str]) -> list[str]:
    """``layout``'s differences from ``base`` as ``setting=value``, by the config names of ``names``."""
    changes = []
    for field_name, setting in names.items():
        old, new = getattr(base, field_name), getattr(layout, field_name)
        if old == new:
            continue
        if isinstance(new, Recompute):
            value = "null" if new.granularity is None else new.granularity
            changes.append(f"{setting}={value}")
            if new.granularity == "full":
                prefix = setting.rsplit(".", 1)[0]
                changes += [f"{prefix}.method={new.method}", f"{prefix}.num_layers={new.num_layers}"]
        else:
            changes.append(f"{setting}={str(new).lower() if isinstance(new, bool) else new}")
    if "tp" in names and (base.tp, base.pp, base.ep) != (layout.tp, layout.pp, layout.ep):
        changes.append(f"(data-parallel size {layout.dp})")
    return changes


def memory_refusal(plan: MemoryPlan, device_bytes: int, margin_bytes: int, fits: list[MemoryPlan],
                   names: dict[str, str], limit: int = 3) -> str | None:
    """Why ``plan`` cannot start on a device of ``device_bytes`` keeping ``margin_bytes`` free, or None when its
    peak fits: the phase, its parts, and the first ``limit`` of ``fits`` (cheapest first) as settings to set."""
    budget = device_bytes - margin_bytes
    if plan.peak <= budget:
        return None
    phase = plan.peak_phase
    parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in
                      sorted(phase.parts.items(), key=lambda item: -item[1]) if value)
    lines = [f"the {phase.name} phase needs {phase.total / GIB:.2f} GiB per GPU (pipeline stage {phase.stage}; "
             f"GiB: {parts}), more than this device's {device_bytes / GIB:.2f} GiB less memory_check.margin_gib="
             f"{margin_bytes / GIB:g} ({budget / GIB:.2f} GiB)."]
    if fits:
        lines.append("Cheapest settings that fit (cheapest first):")
        for fit in fits[:limit]:
            changes = changed_settings(plan.layout, fit.layout, names) or ["(none)"]
            lines.append(f"  {' '.join(changes)}  -> peak {fit.peak / GIB:.2f} GiB ({fit.peak_phase.name})")
    else:
        lines.append("No recompute, token budget, offload or TP / PP setting the planner tried fits: use more GPUs.")
    lines.append("Set memory_check.enabled=false to start anyway.")
    return "\n".join(lines)


def phase_table(plan: MemoryPlan) -> list[str]:
    """The plan as aligned lines in GiB (2^30 bytes): a row per part, a column per phase and the all-resident
    total, then the peak."""
    layout = plan.layout
    phases = plan.phases
    all_resident = {k: v for k, v in plan.per_gpu_bytes.items() if k != "total"}
    names = list(dict.fromkeys(name for phase in phases for name in phase.parts))
    names += [name for name in all_resident if name not in names]
    names = [name for name in names if any(p.parts.get(name) for p in phases) or all_resident.get(name)]
    head = [f"per GPU, GiB; TP {layout.tp} x PP {layout.pp} x DP {layout.dp}"
            + (f", EP {layout.ep}" if layout.ep > 1 else "") + f"; recompute policy {layout.policy_recompute}, "
            f"reward {layout.reward_recompute}; token budgets {layout.max_tokens_per_micro_batch or '-'} / "
            f"{layout.reward_max_tokens_per_micro_batch or '-'}:"]
    width = max(13, *(len(phase.name) + 1 for phase in phases))
    head.append(f"  {'':<26}" + "".join(f"{phase.name:>{width}}" for phase in phases) + f"{'all-resident':>14}")
    rows = [f"  {name:<26}" + "".join(f"{phase.parts.get(name, 0) / GIB:>{width}.2f}" for phase in phases)
            + f"{all_resident.get(name, 0) / GIB:>14.2f}" for name in names]
    rows.append(f"  {'total':<26}" + "".join(f"{phase.total / GIB:>{width}.2f}" for phase in phases)
                + f"{plan.total / GIB:>14.2f}")
    if layout.pp > 1:  # each column is the stage that holds the most in that phase
        head.append(f"  {'pipeline stage':<26}" + "".join(f"{phase.stage:>{width}}" for phase in phases)
                    + f"{plan.stage:>14}")
    where = "" if layout.pp == 1 else f" on pipeline stage {plan.peak_phase.stage}"
    return head + rows + [f"peak: {plan.peak_phase.name}, {plan.peak / GIB:.2f} GiB{where}"]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80 * 10^9, '80GiB' -> 80 * 2^30, '1234' -> 1234 bytes (units are case-insensitive)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, "
                         "MiB, GiB, TiB), e.g. 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
