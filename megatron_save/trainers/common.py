"""Pieces every training stage shares: run settings, start-up from a checkpoint, batching, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import MISSING, OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_save.checkpoint.model_checkpoint import (
    HF_SUBDIR,
    META_FILE,
    build_model_from_checkpoint,
    read_checkpoint_meta,
)
from megatron_save.algorithms import pairwise_accuracy
from megatron_save.config import ParallelConfig, RecomputeSettings, check_recompute, load_config, merge_config
from megatron_save.config.describe import format_settings
from megatron_save.data.batching import B, PairBatch, length_grouped_batches
from megatron_save.data.token_budget import rank_partition, share_scales
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
    max_tokens_per_micro_batch: int = 0
    """When > 0, token-budget micro-batches replace micro_batch_size: each holds rows x its own longest row at most
    this many tokens (a preference pair's two rows together), as many on every data-parallel rank; 0: fixed."""
    epochs: int = 1
    """Passes over the training data."""
    seed: int = 1234
    """Seed of the data order."""


BATCH_BUDGET = "batch.max_tokens_per_micro_batch"
"""The setting that token-budget errors of stages 1, 2 and SFT name."""


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


def data_parallel_shares(indices: list[int], settings: BatchSettings) -> list[list[int]]:
    """Every data-parallel rank's contiguous share of a global batch of example indices ([r]: rank r's), known on
    every rank (what token-budget micro-batches agree their count from)."""
    ranks = parallel_state.get_data_parallel_world_size()
    if settings.max_tokens_per_micro_batch:
        if settings.global_batch_size % ranks:
            raise ValueError(f"global_batch_size={settings.global_batch_size} is not a multiple of data-parallel "
                             f"size {ranks}")
    elif settings.global_batch_size % (ranks * settings.micro_batch_size):
        raise ValueError(
            f"global_batch_size={settings.global_batch_size} is not a multiple of data-parallel size {ranks} x "
            f"micro_batch_size={settings.micro_batch_size}"
        )
    share = len(indices) // ranks
    return [indices[rank * share : (rank + 1) * share] for rank in range(ranks)]


def data_parallel_part(indices: list[int], settings: BatchSettings) -> list[int]:
    """This rank's contiguous share of a global batch of example indices."""
    return data_parallel_shares(indices, settings)[parallel_state.get_data_parallel_rank()]


def budget_micro_batches(batch: B, rows_per_example: int, lengths_per_rank: list[list[int]],
                         weights_per_rank: list[list[float]], budget: int, setting: str) -> list[B]:
    """This rank's examples (``batch``: rows_per_example consecutive rows each) in token-budget micro-batches, each
    padded to its own longest row, as many as on every other data-parallel rank, each with the loss scale
    (``share_scales``) that turns its mean loss into its part of the global batch's mean.

    ``lengths_per_rank[r][k]``: the tokens example k of rank r counts against the budget (every row of it at its
    longest); ``weights_per_rank[r][k]``: its weight in the global mean (1 for a mean over examples, its loss
    tokens for a token mean). A micro-batch left empty (fewer examples than micro-batches) repeats the first
    example with scale 0, so that every rank runs the same schedule."""
    rank, ranks = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    parts = rank_partition(lengths_per_rank, rank, budget, setting)
    weights = weights_per_rank[rank]
    scales = share_scales([sum(weights[k] for k in part) for part in parts],
                          sum(sum(w) for w in weights_per_rank), ranks)
    micro_batches = []
    for part, scale in zip(parts, scales):
        rows = [k * rows_per_example + j for k in (part or [0]) for j in range(rows_per_example)]
        width = int(batch.attention_mask[rows].sum(dim=1).max())
        micro_batches.append(dataclasses.replace(batch.select(rows, width), loss_scale=scale if part else 0.0))
    return micro_batches


def pair_micro_batches(pairs: list[PreferencePair], indices: list[int], settings: BatchSettings,
                       pad_id: int) -> list[PairBatch]:
    """This rank's micro-batches of a global batch: ``micro_batch_size`` pairs each, padded to the global batch's
    longest sequence, or with ``max_tokens_per_micro_batch`` token-budget micro-batches (a pair's two rows in one,
    counted at the micro-batch's longest row) with loss scales that keep the mean over the global batch's pairs."""
    length = max(pairs[i].length for i in indices)
    shares = data_parallel_shares(indices, settings)
    mine = shares[parallel_state.get_data_parallel_rank()]
    rows = [ids for i in mine for ids in (pairs[i].chosen_ids, pairs[i].rejected_ids)]
    batch = PairBatch(*pad_rows(rows, pad_id, length))
    budget = settings.max_tokens_per_micro_batch
    if not budget:
        return batch.split(2 * settings.micro_batch_size)
    if 2 * length > budget:
        longest = max(indices, key=lambda i: pairs[i].length)
        raise ValueError(f"{BATCH_BUDGET}={budget} is smaller than pair {longest} (chosen + rejected at its longer "
                         f"row of {length} tokens: {2 * length}); raise it to at least {2 * length}")
    return budget_micro_batches(batch, 2, [[2 * pairs[i].length for i in share] for share in shares],
                                [[1.0] * len(share) for share in shares], budget, BATCH_BUDGET)


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


COMMAND_LINE_OPTIONS = ("-h", "--help", "--print-config")
"""The options of a trainer command; every other argument is a YAML file or a ``key=value`` override."""


def command_usage(command: str) -> str:
    """The two usage lines of a YAML-driven command."""
    return (f"usage: megatron-save {command} CONFIG.yaml [MORE.yaml ...] [key=value ...] [--print-config]\n"
            f"       torchrun [...] -m megatron_save {command} CONFIG.yaml [MORE.yaml ...] [key=value ...]")


def command_help(schema: type, command: str) -> str:
    """``--help``: the usage, then every setting of ``schema`` (dotted key, type, default, docstring)."""
    summary = " ".join((schema.__doc__ or "").split())
    return (f"{command_usage(command)}\n\n{summary}\n\nYAML files merge in order, then the key=value overrides "
            "(dotted keys, YAML values).\n  --print-config  print the merged configuration (YAML) and exit\n"
            f"  -h, --help      show this help and exit\n\nsettings:\n{format_settings(schema)}\n")


def command_line_error(command: str, error: BaseException) -> SystemExit:
    """A bad command line or config: one line on stderr (rank 0), exit status 2; ``MEGATRON_SAVE_DEBUG=1`` raises
    the error itself, with its traceback."""
    if os.environ.get("MEGATRON_SAVE_DEBUG", "") not in ("", "0"):
        raise error
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"megatron-save {command}: error: {error}\n")
    return SystemExit(2)


def run_from_command_line(schema: type, train: Callable[[Any], Any], command: str, argv: list[str],
                          check: Callable[[Any], None] | None = None) -> None:
    """``python -m megatron_save COMMAND CONFIG.yaml [MORE.yaml ...] [key=value ...]``: loads the config (later
    files override earlier ones, then the overrides), checks it (``check``, then ``check_settings``), trains
    holding the run directory's lock, shuts the process groups down. ``--help`` lists the settings,
    ``--print-config`` prints the merged config; a bad file, setting or value ends in one line (exit 2)."""
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(command_help(schema, command))
        raise SystemExit(0)
    options = [arg for arg in argv if arg.startswith("-")]
    args = [arg for arg in argv if not arg.startswith("-")]
    files = [arg for arg in args if "=" not in arg]
    try:
        unknown = [arg for arg in options if arg not in COMMAND_LINE_OPTIONS]
        if unknown:
            raise ValueError(f"unknown option {unknown[0]} (options: --help, --print-config; settings are "
                             "key=value)")
        if not files:
            raise ValueError(f"no config file\n{command_usage(command)}\n(--help lists the settings)")
        if args[: len(files)] != files:
            raise ValueError(f"the YAML files come before the key=value overrides: {' '.join(args)}")
        if "--print-config" in options:
            sys.stdout.write(OmegaConf.to_yaml(merge_config(schema, files, args[len(files):])))
            raise SystemExit(0)
        cfg = load_config(schema, files, args[len(files):])
        if check is not None:
            check(cfg)
        check_settings(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise command_line_error(command, error) from None
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
        if isinstance(value, BatchSettings) and value.max_tokens_per_micro_batch < 0:
            raise ValueError(f"{name}.max_tokens_per_micro_batch={value.max_tokens_per_micro_batch}: must be >= 0 "
                             "(0: fixed micro-batches of micro_batch_size)")
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
