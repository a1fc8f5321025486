"""Pieces every training stage shares: run settings, start-up from a checkpoint, batching, progress."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import MISSING
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_save.checkpoint.model_checkpoint import (
    HF_SUBDIR,
    META_FILE,
    build_model_from_checkpoint,
    read_checkpoint_meta,
)
from megatron_save.algorithms import pairwise_accuracy
from megatron_save.config import ParallelConfig, RecomputeSettings, check_recompute, load_config
from megatron_save.data.batching import PairBatch, length_grouped_batches
from megatron_save.data.preference import PreferencePair
from megatron_save.distributed import ParallelLayoutError, init_distributed, shutdown_distributed
from megatron_save.models.forward import score_token_sequences
from megatron_save.models.gpt_config import model_shape
from megatron_save.trainers.optimizer import DECAY_STYLES, OptimizerSettings
from megatron_save.utils.files import LOCK_FILE, RunLock
from megatron_save.utils.tensors import pad_rows


@dataclass
class DataSettings:
    """Where a stage's training and held-out examples come from (each stage's config says its row format)."""

    train_data: str = MISSING
    """Training rows: a json / jsonl / parquet file, or a hub dataset name."""
    split: str = "train"
    """Split of a hub dataset (train_data and eval_data)."""
    eval_data: str | None = None
    """Held-out rows of the same format; when unset, the first ``eval_fraction`` of train_data is held out."""
    eval_fraction: float = 0.05
    """Share of train_data held out when eval_data is unset."""
    max_length: int = 2048
    """Examples whose conversation (prompt + response) is longer, in tokens, are skipped (and counted)."""


@dataclass
class BatchSettings:
    """How examples are grouped into steps."""

    global_batch_size: int = 32
    """Examples per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Examples per forward pass on one rank (gradient accumulation makes up the rest)."""
    epochs: int = 1
    """Passes over the training data."""
    seed: int = 1234
    """Seed of the data order."""


def start_from_checkpoint(checkpoint: str, parallel: ParallelConfig, add_value_head: bool = False,
                          recompute: RecomputeSettings | None = None):
    """Starts torch.distributed and Megatron's groups for the checkpoint's model, then builds and loads it, with
    ``recompute`` (the stage's top-level ``recompute`` setting) as its activation recompute.

    Returns (model, meta, tokenizer).
    """
    _, hf_config = read_checkpoint_meta(checkpoint)
    if recompute is not None:
        # The layout's layer counts, before any process group or model exists.
        check_recompute(recompute, "recompute", hf_config.num_hidden_layers // parallel.pipeline_model_parallel_size)
    init_distributed(parallel, model_shape(hf_config, f"checkpoint={checkpoint}"))
    model, meta, _ = build_model_from_checkpoint(checkpoint, add_value_head=add_value_head, recompute=recompute)
    tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint) / HF_SUBDIR)
    return model, meta, tokenizer


def hold_out(examples: list, fraction: float, source: str) -> tuple[list, list]:
    """(training, held-out) with the first ``fraction`` of ``examples`` held out; refuses an empty side."""
    count = int(len(examples) * fraction)
    if count == 0 or count == len(examples):
        raise ValueError(f"{source}: holding out data.eval_fraction={fraction} of {len(examples)} examples leaves "
                         f"{'nothing to evaluate' if count == 0 else 'nothing to train on'}; set data.eval_data or "
                         "data.eval_fraction")
    return examples[count:], examples[:count]


def load_examples(settings: DataSettings, loader: Callable[..., tuple[list, Any]], tokenizer) -> tuple[list, list]:
    """(training, held-out) examples: ``loader(path, tokenizer, max_length, split)`` of train_data, and of
    eval_data when it is set, else the first eval_fraction of train_data; refuses an empty held-out set."""
    load = lambda path: loader(path, tokenizer, settings.max_length, settings.split)[0]  # noqa: E731
    train = load(settings.train_data)
    if not settings.eval_data:
        return hold_out(train, settings.eval_fraction, settings.train_data)
    held_out = load(settings.eval_data)
    if not held_out:
        raise ValueError(f"data.eval_data {settings.eval_data}: no examples to evaluate")
    return train, held_out


def ensure_output_dir(path: str, resuming: bool) -> None:
    """Collective: refuses a non-empty output directory before any work, unless the run resumes into it."""
    if dist.get_rank() == 0:
        directory = Path(path)
        if directory.exists() and any(p.name != LOCK_FILE for p in directory.iterdir()) and not resuming:
            raise FileExistsError(f"output_dir {path} exists and is not empty; choose a new one")
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def data_parallel_part(indices: list[int], settings: BatchSettings) -> list[int]:
    """This rank's contiguous share of a global batch of example indices."""
    ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if settings.global_batch_size % (ranks * settings.micro_batch_size):
        raise ValueError(
            f"global_batch_size={settings.global_batch_size} is not a multiple of data-parallel size {ranks} x "
            f"micro_batch_size={settings.micro_batch_size}"
        )
    share = len(indices) // ranks
    return indices[rank * share : (rank + 1) * share]


def pair_micro_batches(pairs: list[PreferencePair], indices: list[int], settings: BatchSettings,
                       pad_id: int) -> list[PairBatch]:
    """This rank's micro-batches of a global batch, all padded to the global batch's longest sequence."""
    length = max(pairs[i].length for i in indices)
    rows = [ids for i in data_parallel_part(indices, settings) for ids in (pairs[i].chosen_ids, pairs[i].rejected_ids)]
    return PairBatch(*pad_rows(rows, pad_id, length)).split(2 * settings.micro_batch_size)


def epoch_batches(lengths: list[int], settings: BatchSettings, source: str, unit: str) -> list[list[int]]:
    """Global batches of example indices for every epoch (length-grouped, reshuffled with seed + epoch); refuses a
    dataset too small for one batch, naming ``source`` and counting its ``unit``."""
    batches = [batch for epoch in range(settings.epochs)
               for batch in length_grouped_batches(lengths, settings.global_batch_size, seed=settings.seed + epoch)]
    if not batches:
        raise ValueError(f"{source}: {len(lengths)} {unit} make no batch of {settings.global_batch_size}")
    return batches


def progress(total: int, description: str) -> tqdm:
    """A progress bar on global rank 0 only."""
    return tqdm(total=total, desc=description, disable=dist.get_rank() != 0, dynamic_ncols=True)


def run_from_command_line(schema: type, train: Callable[[Any], Any], command: str, argv: list[str]) -> None:
    """``python -m megatron_save COMMAND CONFIG.yaml [MORE.yaml ...] [key=value ...]``: loads the config (later
    files override earlier ones, then the overrides), trains holding the run directory's lock, shuts the process
    groups down."""
    files = [arg for arg in argv if "=" not in arg]
    if not files or argv[: len(files)] != files:
        raise SystemExit(f"usage: torchrun [...] -m megatron_save {command} CONFIG.yaml [MORE.yaml ...] "
                         "[key=value ...]")
    cfg = load_config(schema, files, argv[len(files):])
    with RunLock(cfg.output_dir):
        try:
            train(cfg)
        except ParallelLayoutError as error:  # raised before any process group exists: one line, no traceback
            raise SystemExit(f"megatron_save {command}: {error}") from None
    shutdown_distributed()


def write_json(path: str | Path, payload: Any) -> None:
    """Rank 0 writes ``payload`` as JSON."""
    if dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


_DATA_FIELDS = ("train_data", "eval_data", "offline_data")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def check_settings(cfg: Any, prefix: str = "") -> None:
    """Refuses, before any model is built and naming the setting: a negative learning rate or warm-up, a
    min_lr_ratio outside [0, 1], an unknown decay style, invalid recompute settings, an output_dir that is a file,
    a local data file or a model checkpoint that does not exist. Walks every nested settings dataclass of ``cfg``."""
    for item in dataclasses.fields(cfg):
        name, value = f"{prefix}{item.name}", getattr(cfg, item.name)
        if dataclasses.is_dataclass(value):
            check_settings(value, f"{name}.")
        if isinstance(value, OptimizerSettings):
            if value.lr < 0 or value.value_head_lr < 0 or value.warmup_steps < 0:
                raise ValueError(f"{name}: lr={value.lr}, value_head_lr={value.value_head_lr} and warmup_steps="
                                 f"{value.warmup_steps} must be >= 0")
            if not 0.0 <= value.min_lr_ratio <= 1.0 or value.decay_style not in DECAY_STYLES:
                raise ValueError(f"{name}: min_lr_ratio={value.min_lr_ratio} must be in [0, 1] and decay_style="
                                 f"{value.decay_style!r} one of {', '.join(DECAY_STYLES)}")
        if isinstance(value, RecomputeSettings):
            check_recompute(value, name)
        if item.name == "output_dir" and isinstance(value, str) and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{name}={value} is a file, not a directory")
        if item.name in _DATA_FIELDS and isinstance(value, str) and value.endswith(_DATA_SUFFIXES) \
                and not Path(value).is_file():
            raise FileNotFoundError(f"{name}={value}: no such data file")
        if item.name == "checkpoint" and isinstance(value, str) and not (Path(value) / META_FILE).is_file():
            raise FileNotFoundError(f"{name}={value}: not a model checkpoint (no {META_FILE}; convert one with "
                                    "tools/convert_hf_to_megatron.py)")


def pairwise_eval(model, pairs: list[PreferencePair], sequences_per_forward: int, pad_id: int,
                  description: str | None = "held-out") -> float:
    """Collective: accuracy over every pair (chosen strictly above rejected), the same on every rank."""
    if not pairs:
        raise ValueError("no held-out pairs to evaluate")
    sequences = [ids for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)]
    rewards = score_token_sequences(model, sequences, pad_id, sequences_per_forward, description=description).rewards
    return pairwise_accuracy(rewards[0::2], rewards[1::2]).item()
