"""torchrun worker (the vLLM tier): the vLLM rollout engine against transformers on the same weights, in a
trainer's process (Megatron's world on gloo, the CPU compatibility layer in place).

For each tiny model: greedy tokens against transformers ``generate``; per-token log-probs against a transformers
forward (greedy, temperature only, temperature with top-p and top-k); then ``update_weights`` with another
model's weights and the same prompts again (each longer than one KV-cache block, so a stale prefix cache would
show). Also records what building the engine changed in the process. Rank 0 writes the results as JSON.
"""

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_save.config import ParallelConfig
from megatron_save.distributed import init_distributed, shutdown_distributed
from megatron_save.rollout import SamplingSettings, VLLMRolloutEngine, VLLMSettings

SAMPLINGS = {
    "greedy": SamplingSettings(n=1, temperature=0.0, max_new_tokens=16),
    "temperature": SamplingSettings(n=2, temperature=0.7, max_new_tokens=16, seed=11),
    "top_p_top_k": SamplingSettings(n=2, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=16, seed=12),
}


def prompts(count: int = 3, length: int = 150, seed: int = 0) -> list[list[int]]:
    """Random prompts of ids 3..127 (no special tokens), ``length`` - 9 * i tokens: each longer than one of the
    CPU backend's 128-token cache blocks."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length - 9 * i,), generator=generator).tolist() for i in range(count)]


def processed_logprobs(logits: torch.Tensor, sampling: SamplingSettings) -> torch.Tensor:
    """Log-probs of the distribution vLLM samples from ([T, V] logits): temperature, then top-k, then top-p."""
    if sampling.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= sampling.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def compare(engine: VLLMRolloutEngine, model: torch.nn.Module, prompt_ids: list[list[int]]) -> dict:
    """Per sampling: whether greedy tokens equal transformers' generate, and the largest |log-prob difference|."""
    result = {}
    for name, sampling in SAMPLINGS.items():
        rollouts = engine.generate(prompt_ids, sampling)
        worst, equal = 0.0, True
        for prompt, responses, logprobs in zip(prompt_ids, rollouts.response_ids, rollouts.logprobs):
            for response, response_logprobs in zip(responses, logprobs):
                if name == "greedy":
                    expected = model.generate(torch.tensor([prompt]), max_new_tokens=sampling.max_new_tokens,
                                              do_sample=False)[0, len(prompt):].tolist()
                    equal &= expected == response
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
                reference = processed_logprobs(logits, sampling).gather(-1, torch.tensor(response)[:, None])[:, 0]
                worst = max(worst, (reference - torch.tensor(response_logprobs)).abs().max().item())
        result[name] = {"tokens_equal": equal, "max_logprob_error": worst,
                        "tokens": sum(len(r) for group in rollouts.response_ids for r in group)}
    return result


def seed_all(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def draws() -> tuple:
    """One draw from each global generator: Python's, NumPy's, torch's."""
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def process_settings() -> dict:
    """What an in-process vLLM engine could change for the whole trainer process."""
    return {"environment": {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")},
            "threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)),
            "set_num_threads": torch.set_num_threads.__module__ + "." + torch.set_num_threads.__qualname__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="JSON: name -> {hf: dir, new: dir of other weights}")
    parser.add_argument("--vllm-tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(ParallelConfig())
    settings = VLLMSettings(tensor_parallel_size=args.vllm_tp, kv_cache_memory_gib=0.125,
                            sleep_between_rollouts=False, enforce_eager=True)
    results = {}
    prompt_ids = prompts()
    for name, dirs in json.loads(Path(args.models).read_text()).items():
        before = process_settings()
        seed_all(1)
        expected_draws = draws()
        seed_all(1)
        engine = VLLMRolloutEngine(dirs["hf"], settings, torch.float32, max_model_len=256, max_batch_size=8,
                                   seed=0, return_logprobs=True)
        results[f"{name}/rng_kept"] = draws() == expected_draws  # building the engine reseeds none of them
        after = process_settings()
        results[f"{name}/process"] = {key: before[key] == after[key] for key in before}
        results[f"{name}/process_changed"] = sorted(
            k for k in set(before["environment"]) | set(after["environment"])
            if before["environment"].get(k) != after["environment"].get(k))
        model = AutoModelForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32).eval()
        results[f"{name}/initial"] = compare(engine, model, prompt_ids)
        new_model = AutoModelForCausalLM.from_pretrained(dirs["new"], dtype=torch.float32).eval()
        engine.update_weights(new_model.state_dict().items())
        results[f"{name}/updated"] = compare(engine, new_model, prompt_ids)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({f"rank{rank}/{k}": v for rank, part in enumerate(everything)
                                              for k, v in part.items()}, indent=2))
    shutdown_distributed()


if __name__ == "__main__":
    main()
