"""The per-phase memory plan (megatron_save/planning/memory.py) against the bytes each phase of a stage-3 step
really holds, on CPU, at two layouts, one launch each (the launch's size picks the layout; --append adds the
second to the first's report):

    torchrun --nproc-per-node 1 tools/validate_memory_plan.py --size 135m --out docs/perf/memory_plan_validation.txt
    torchrun --nproc-per-node 2 tools/validate_memory_plan.py --size 135m --out docs/perf/memory_plan_validation.txt \
        --append

Layouts: TP=1 x PP=1 x DP=1 with nothing offloaded (1 process), and TP=1 x PP=2 x DP=1 with ``offload.gradients``,
``offload.optimizer`` and ``offload.reference`` on (SmolLM2-135M's 9 heads / 3 kv heads allow no TP=2). The
policy and reference are causal LMs, the reward model a reward model with a value head, with random
weights, Megatron-Core's local spec, the distributed optimizer, after one warm-up step (Adam's states exist),
all in ``--dtype`` (fp32 by default: this CPU's bf16 matrix products are an order of magnitude slower).
What each rank measures, phase by phase, moving state as ``trainers/offload.py``'s IdleOffload does:

- weights, gradient buffers, optimizer states: the bytes of their storages (DDP's param and grad buffers, the
  optimizer's own tensors); a freed gradient buffer has none; offloaded optimizer states and reference weights
  are on the host (on CPU the host is the device, so IdleOffload's record of what it moved decides);
- rollout: a transformers model of the policy's config on the first pipeline stage (the engine's copy) and the
  KV cache of ``--rollout-batch`` sequences of full length (its DynamicCache's tensors after a forward);
- forwards without backward (log-probs of the policy and the reference, RM scoring): the peak of the bytes
  allocated while the package's own ``sequence_logprobs`` / ``score_sequences`` run, tracked per storage;
- updates: the peak of the live bytes autograd saves for backward (parameters excluded) while the package's
  ``forward_backward`` runs 4 micro-batches through Megatron's schedule (1F1B under PP).

Each rank compares its phases with the planner's phases of its own pipeline stage; rank 0 writes the table.

On a GPU (``measure_layout`` follows ``compute_device()``; tests/gpu/test_gpu_memory_plan.py runs it there) the
forwards' and updates' own bytes are ``torch.cuda.max_memory_allocated()`` over them less what was allocated when
they began (the planner's forward and activation parts are what a phase adds to the state it keeps), and each phase
also records its whole peak: ``max_memory_allocated`` over the phase less what the process held before the layout
was built, which the planner's phase total must match as well.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_save.config import ParallelConfig  # noqa: E402
from megatron_save.data.batching import TokenBatch  # noqa: E402
from megatron_save.distributed import compute_device, init_distributed  # noqa: E402
from megatron_save.models.builder import build_model  # noqa: E402
from megatron_save.models.forward import score_sequences  # noqa: E402
from megatron_save.models.policy import sequence_logprobs, token_logprobs  # noqa: E402
from megatron_save.planning.memory import (  # noqa: E402
    MemoryLayout,
    architecture_from_hf,
    stage_phases,
)
from megatron_save.trainers.offload import REFERENCE, IdleOffload, OffloadSettings, optimizer_own_tensors  # noqa: E402
from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state  # noqa: E402
from megatron_save.trainers.step import forward_backward, optimizer_step  # noqa: E402
from megatron_save.utils.provenance import current_provenance  # noqa: E402

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = 0.10
# (hf overrides, prompt, response, policy micro-batch, reward micro-batch, rollout batch)
SIZES = {
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): 134.5M parameters.
    "135m": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                  max_position_embeddings=2048), 64, 64, 2, 2, 8),
    "tiny": (dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256),
             16, 16, 2, 2, 4),
}
LAYOUTS = {1: ("TP1 PP1 DP1, no offload", 1, False), 2: ("TP1 PP2 DP1, offload gradients+optimizer+reference", 2, True)}
"""World size -> (title, PP, offload on): each process holds a whole stage's models, so a launch runs one layout
(two data-parallel copies of 135M's three models and engine do not fit beside the rest of a 24 GB machine)."""


def hf_configs(size: str):
    import transformers

    overrides = SIZES[size][0]
    policy = transformers.LlamaConfig(**overrides, architectures=["LlamaForCausalLM"])
    reward = transformers.LlamaConfig(**overrides, architectures=["LlamaForSequenceClassification"], num_labels=1,
                                      pad_token_id=0)
    return policy, reward


class AllocationPeak(TorchDispatchMode):
    """Peak bytes of the storages that operators allocate inside the mode (a CPU max_memory_allocated): an
    output's storage counts from its creation until it is freed (a weakref finalizer on the storage); in-place
    results and views of inputs are not new memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, ptr: int) -> None:
        self.live -= self.sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self.sizes:
                continue
            self.sizes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr)
        return out


class SavedPeak:
    """Peak of the live bytes autograd keeps for backward (``saved_tensors_hooks``), parameters excluded: a
    storage counts while any saved reference to it is alive (its holder is freed after its backward)."""

    def __init__(self, excluded: set[int]):
        self.excluded, self.count, self.sizes = excluded, Counter(), {}
        self.live = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.excluded:
            return tensor
        return _Held(self, tensor, ptr, storage.nbytes())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tracker: SavedPeak, tensor, ptr: int, nbytes: int):
        self.tracker, self.tensor, self.ptr = tracker, tensor, ptr
        tracker.count[ptr] += 1
        if tracker.count[ptr] == 1:
            tracker.sizes[ptr] = nbytes
            tracker.live += nbytes
            tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self):
        self.tracker.count[self.ptr] -= 1
        if not self.tracker.count[self.ptr]:
            self.tracker.live -= self.tracker.sizes.pop(self.ptr)


@dataclass
class SectionPeak:
    """What one section of a phase adds at its peak (``own``), and on CUDA the device's whole peak over it."""

    own: int = 0
    """Bytes the section allocated on top of what it found, at its peak."""
    whole: int = 0
    """``torch.cuda.max_memory_allocated()`` over the section (0 on CPU, which has no allocator statistics)."""


@contextmanager
def section_peak(device: torch.device, saved_excluding: set[int] | None = None):
    """Measures the body's own peak bytes: on CUDA the allocator's peak over the body less what was allocated when
    it began; on CPU the storages operators allocate (AllocationPeak), or with ``saved_excluding`` (a backward's
    parameters) the bytes autograd saves for backward (SavedPeak)."""
    result = SectionPeak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.whole = torch.cuda.max_memory_allocated()
        result.own = result.whole - before
    elif saved_excluding is None:
        with AllocationPeak() as tracker:
            yield result
        result.own = tracker.peak
    else:
        tracker = SavedPeak(saved_excluding)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            yield result
        result.own = tracker.peak


def device_allocated(device: torch.device) -> int:
    """Bytes the CUDA allocator holds for tensors now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def storages_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def weights_bytes(module) -> int:
    return storages_bytes(list(module.parameters()))


def state_bytes(state, name: str, offload: IdleOffload) -> dict[str, int]:
    """A trained model's weights, gradient buffers and optimizer states on the device now."""
    buffers = [*state.model.buffers, *state.model.expert_parallel_buffers]
    gradients = sum(b.grad_data.untyped_storage().nbytes() for b in buffers)
    params, slots = optimizer_own_tensors(state)
    optimizer = 0 if name in offload.moved else storages_bytes(
        params + [values[key] for values, key in slots if key != "step"])
    return {f"{name}_weights": weights_bytes(state.module), f"{name}_gradients": gradients,
            f"{name}_optimizer_states": optimizer}


def resident(run: dict) -> dict[str, int]:
    offload = run["offload"]
    parts = {**state_bytes(run["policy"], "policy", offload), **state_bytes(run["reward"], "reward", offload)}
    parts["reference_weights"] = 0 if REFERENCE in offload.offloaded else weights_bytes(run["reference"])
    parts["rollout_weights"] = weights_bytes(run["engine"]) if run["engine"] is not None else 0
    parts["rollout_kv_cache"] = 0
    return parts


def measure_layout(pp: int, offloaded: bool, size: str, dtype: str
                   ) -> tuple[MemoryLayout, int, dict[str, dict[str, int]], dict[str, int]]:
    """The layout planned, this rank's pipeline stage, its measured parts per phase, and on CUDA each phase's whole
    peak (``max_memory_allocated`` less what the process held before the layout was built; empty on CPU)."""
    from megatron.core import parallel_state
    import transformers

    init_distributed(ParallelConfig(pipeline_model_parallel_size=pp))
    device = compute_device()
    baseline = device_allocated(device)  # what earlier work in this process (another layout, a test) still holds
    _, prompt, response, mbs, rmbs, rollout_batch = SIZES[size]
    policy_hf, reward_hf = hf_configs(size)
    torch.manual_seed(0)
    settings = OptimizerSettings(lr=1e-5, use_distributed_optimizer=True)
    policy = build_train_state(build_model(policy_hf, "causal_lm", dtype, "local"), settings, 10)
    reward = build_train_state(build_model(reward_hf, "reward_model", dtype, "local", value_head=True), settings, 10)
    reference = build_model(policy_hf, "causal_lm", dtype, "local").eval()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    engine = (transformers.AutoModelForCausalLM.from_config(policy_hf, dtype=DTYPES[dtype]).to(device).eval()
              if stage == 0 else None)
    sequence = prompt + response
    ids = lambda rows: torch.randint(1, policy_hf.vocab_size, (rows, sequence), device=device)  # noqa: E731
    mask = lambda rows: torch.ones(rows, sequence, dtype=torch.bool, device=device)  # noqa: E731
    policy_loss = lambda batch, logits: (  # noqa: E731
        -token_logprobs(logits[:, :-1], batch.input_ids[:, 1:]).mean(), {})
    reward_loss = lambda batch, scores: (scores.float().mean(), {})  # noqa: E731
    batches = {"policy": [TokenBatch(ids(mbs), mask(mbs)) for _ in range(4)],
               "reward": [TokenBatch(ids(rmbs), mask(rmbs)) for _ in range(4)]}
    for name, state, loss in (("policy", policy, policy_loss), ("reward", reward, reward_loss)):
        forward_backward(state, batches[name][:pp], loss)  # warm-up step: Adam's states exist from here on
        optimizer_step(state)
    offload_settings = OffloadSettings(optimizer=offloaded, gradients=offloaded, reference=offloaded)
    offload = IdleOffload(offload_settings, {"policy": policy, "reward": reward}, reference)
    offload.offload_all()
    run = dict(policy=policy, reward=reward, reference=reference, engine=engine, offload=offload)
    measured, whole = {}, {}

    def phase_whole(phase: str, *sections: SectionPeak) -> None:
        """A phase's whole peak on CUDA: its fullest section, or what it holds when it does no work."""
        if device.type == "cuda":
            whole[phase] = max([device_allocated(device), *(s.whole for s in sections)]) - baseline

    parts = resident(run)
    # On CPU nothing of the engine's forward but its cache is compared: no tracker slows it down.
    with section_peak(device) if device.type == "cuda" else nullcontext(SectionPeak()) as rollout:
        if engine is not None:
            with torch.no_grad():  # a generating engine computes the logits of the last token only
                cache = engine(ids(rollout_batch), use_cache=True, logits_to_keep=1).past_key_values
            kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            parts["rollout_kv_cache"] = storages_bytes(kv)
    measured["rollout"] = parts
    phase_whole("rollout", rollout)
    cache = kv = None

    with offload.resident(REFERENCE):
        parts = resident(run)
        rows = ids(mbs)
        peaks = []
        for model in (policy.module, reference):
            with torch.no_grad(), section_peak(device) as peak:
                sequence_logprobs(model, rows, mbs)
            peaks.append(peak)
        measured["logprobs"] = {**parts, "policy_forward": max(peak.own for peak in peaks)}
        phase_whole("logprobs", *peaks)

    parts = resident(run)
    with torch.no_grad(), section_peak(device) as peak:
        score_sequences(reward.module, ids(rmbs), mask(rmbs), rmbs)
    measured["rm_scoring"] = {**parts, "reward_forward": peak.own}
    phase_whole("rm_scoring", peak)

    for phase, name, state, loss in (("rm_update", "reward", reward, reward_loss),
                                     ("policy_update", "policy", policy, policy_loss)):
        with offload.resident(name):
            parts = resident(run)
            excluded = {p.untyped_storage().data_ptr() for p in state.module.parameters()}
            with section_peak(device, excluded) as peak:
                forward_backward(state, batches[name], loss)
            measured[phase] = {**parts, f"{name}_activations": peak.own}
            phase_whole(phase, peak)

    layout = MemoryLayout(pp=pp, dp=dist.get_world_size() // pp, dtype=dtype, micro_batch=mbs, reward_micro_batch=rmbs,
                          prompt_length=prompt, response_length=response, rollout_batch=rollout_batch,
                          distributed_optimizer=True, offload_optimizer=offloaded, offload_gradients=offloaded,
                          offload_reference=offloaded, value_head=True, spec="local", fused_activation=False)
    return layout, stage, measured, whole


def compare(layout: MemoryLayout, stage: int, measured: dict, size: str, whole: dict | None = None) -> list[tuple]:
    """(phase, predicted bytes, measured bytes, worst part, its predicted, its measured, the phase's whole peak on
    CUDA or 0) per phase."""
    policy_hf, reward_hf = hf_configs(size)
    policy, reward = architecture_from_hf(policy_hf, False), architecture_from_hf(reward_hf, True)
    rows = []
    for phase in stage_phases(policy, reward, layout, stage):
        got = measured[phase.name]
        names = set(got) | {k for k, v in phase.parts.items() if v}
        worst = max(names, key=lambda k: abs(phase.parts.get(k, 0) - got.get(k, 0)))
        rows.append((phase.name, phase.total, sum(got.values()), worst, phase.parts.get(worst, 0), got.get(worst, 0),
                     (whole or {}).get(phase.name, 0)))
    return rows


VERDICT = re.compile(r"^  largest difference at this layout: ([0-9.]+)%$", re.M)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="135m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the models' dtype")
    parser.add_argument("--out", type=Path, required=True, help="the report (written by rank 0)")
    parser.add_argument("--append", action="store_true", help="add this layout to the report's layouts")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    command = f"torchrun --nproc-per-node {world} tools/validate_memory_plan.py " + " ".join(sys.argv[1:])
    provenance = current_provenance(command)  # the code as it starts
    if world not in LAYOUTS:
        raise SystemExit(f"validate_memory_plan: run it with 1 or 2 processes, not {world}")
    title, pp, offloaded = LAYOUTS[world]
    layout, stage, measured, whole = measure_layout(pp, offloaded, args.size, args.dtype)
    rows = compare(layout, stage, measured, args.size, whole)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dist.get_rank(), stage, rows))
    if dist.get_rank() != 0:
        return
    policy_hf, _ = hf_configs(args.size)
    params = architecture_from_hf(policy_hf, False)
    _, prompt, response, mbs, rmbs, rollout_batch = SIZES[args.size]
    lines = [f"== {title}", provenance.as_text(), "",
             f"size {args.size}: Llama shape hidden {params.hidden}, {params.layers} layers, {params.heads} heads / "
             f"{params.kv_heads} kv heads, vocab {params.vocab}; {args.dtype}, local spec, distributed optimizer; "
             f"sequences of {prompt} + {response} tokens, policy micro-batch {mbs}, RM micro-batch {rmbs} (value "
             f"head), rollout batch {rollout_batch}, 4 micro-batches per update",
             "per rank (MiB): phase, predicted (planner, its pipeline stage), measured, difference; the part that "
             "differs most, predicted / measured"]
    worst = 0.0
    for rank, stage, rows in sorted(gathered):
        for phase, predicted, got, part, part_predicted, part_got, peak in rows:
            error = (predicted - got) / got
            worst = max(worst, abs(error))
            line = (f"  rank {rank} stage {stage} {phase:<14}{predicted / MIB:>10.2f}{got / MIB:>10.2f}"
                    f"{error:>+9.2%}   {part} {part_predicted / MIB:.2f} / {part_got / MIB:.2f}")
            if peak:  # CUDA: the phase's max_memory_allocated counts in the verdict too
                worst = max(worst, abs((predicted - peak) / peak))
                line += f"; max_memory_allocated {peak / MIB:.2f} ({(predicted - peak) / peak:+.2%})"
            lines.append(line)
    lines.append(f"  largest difference at this layout: {worst:.2%}")
    previous = args.out.read_text().rsplit("\n\nlargest phase difference", 1)[0] if args.append else ""
    sections = ([previous] if previous else []) + ["\n".join(lines)]
    text = "\n\n".join(sections)
    worst = max(float(found) for found in VERDICT.findall(text)) / 100
    layouts = len(VERDICT.findall(text))
    verdict = "PASS" if worst <= TOLERANCE else "FAIL"
    text += (f"\n\nlargest phase difference over {layouts} layout(s): {worst:.2%} (tolerance {TOLERANCE:.0%}): "
             f"{verdict}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
