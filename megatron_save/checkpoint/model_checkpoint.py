"""A model checkpoint: Megatron dist_checkpointing weights (load at any TP / PP) plus the HF config they came from.

Layout of ``CKPT_DIR``::

    megatron_save.json   CheckpointMeta: family, kind, dtype, value head, the megatron-core that wrote it
    hf/                  the Hugging Face config, tokenizer and generation files
    weights/             torch_dist checkpoint written by megatron.core.dist_checkpointing
    manifest.json        size and SHA-256 of every file of the three above (utils/files.py)

The directory may hold other things beside these (a trainer's metrics); the manifest covers the checkpoint's
own entries, and a file in them that it does not list is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from megatron_save.checkpoint.megatron_version import installed_megatron_core, refuse_newer_megatron_core
from megatron_save.config.recompute import RecomputeSettings
from megatron_save.models.builder import build_model
from megatron_save.utils.files import (
    MANIFEST_FILE,
    CorruptCheckpointError,
    missing_manifest,
    tree_fingerprint,
    verify_manifest,
    write_manifest,
)
from megatron_save.utils.logging import get_logger

logger = get_logger("checkpoint.model_checkpoint")
VERIFY_ENV = "MEGATRON_SAVE_VERIFY"
_verified: set[tuple[str, str, tuple]] = set()  # checkpoints this process verified (path, mode, tree_fingerprint)

META_FILE = "megatron_save.json"
HF_SUBDIR = "hf"
WEIGHTS_SUBDIR = "weights"
CHECKPOINT_PARTS = (META_FILE, HF_SUBDIR, WEIGHTS_SUBDIR)
FORMAT_VERSION = 2
"""2: always has manifest.json. 1: written before or after manifests existed; those after record megatron_core."""
READABLE_FORMATS = (1, 2)
VALUE_HEAD_PREFIX = "output_layer.value_head."
# Everything of an HF model directory except its weights: config, tokenizer, chat template, generation config.
HF_SIDE_FILE_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
HF_WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class CheckpointMeta:
    """What a checkpoint holds, enough to rebuild the model at any parallel layout."""

    family: str
    """Decoder family (llama, qwen2, qwen3)."""
    kind: str
    """``causal_lm`` or ``reward_model``."""
    dtype: str
    """Parameter dtype the weights were saved in (fp32 or bf16)."""
    value_head: bool = False
    """Reward model carries a value head beside the reward head."""
    format_version: int = FORMAT_VERSION
    """Layout version of this directory."""
    megatron_core: str | None = None
    """Version of the megatron-core that wrote the weights (None: written before it was recorded)."""


def copy_hf_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copies config / tokenizer / generation files (not weights or weight indices); returns their names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in HF_SIDE_FILE_PATTERNS:
        for path in sorted(src_dir.glob(pattern)):
            if path.name not in HF_WEIGHT_INDEX_FILES and path.is_file():
                shutil.copy2(path, dst_dir / path.name)
                copied.append(path.name)
    return copied


def ensure_new_dir(path: str | Path) -> Path:
    """Creates ``path``; refuses one that exists and is not empty, so nothing is overwritten."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_model_checkpoint(model: Any, ckpt_dir: str | Path, meta: CheckpointMeta, hf_dir: str | Path) -> None:
    """Collective: every rank writes its shards; rank 0 writes the metadata, copies the HF side files and writes
    the manifest of every file's size and SHA-256."""
    ckpt_dir = Path(ckpt_dir)
    weights_dir = ckpt_dir / WEIGHTS_SUBDIR
    if dist.get_rank() == 0:
        weights_dir.mkdir(parents=True, exist_ok=True)
        copy_hf_side_files(hf_dir, ckpt_dir / HF_SUBDIR)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(weights_dir))
    dist.barrier()
    if dist.get_rank() == 0:
        written = replace(meta, megatron_core=installed_megatron_core())
        (ckpt_dir / META_FILE).write_text(json.dumps(asdict(written), indent=2) + "\n")
        write_manifest(ckpt_dir, CHECKPOINT_PARTS)
    dist.barrier()


def read_checkpoint_meta(ckpt_dir: str | Path) -> tuple[CheckpointMeta, Any]:
    """The checkpoint's metadata and its transformers config."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no {META_FILE}; not a megatron-save model checkpoint")
    try:
        meta = CheckpointMeta(**json.loads(meta_path.read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{meta_path}: not a valid checkpoint description ({error})") from None
    if meta.format_version not in READABLE_FORMATS:
        raise ValueError(f"{meta_path}: format_version {meta.format_version}, this package reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
    refuse_newer_megatron_core(ckpt_dir, meta.megatron_core)
    hf_config = ckpt_dir / HF_SUBDIR / "config.json"
    if not hf_config.is_file():
        raise FileNotFoundError(f"{hf_config}: missing; the checkpoint's transformers config is needed to build "
                                "the model")
    return meta, AutoConfig.from_pretrained(ckpt_dir / HF_SUBDIR)


def load_model_checkpoint(model: Any, ckpt_dir: str | Path, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Collective: loads the weights into this rank's (TP / PP sharded) model, resharding as needed.

    Parameters whose names start with one of ``skip_prefixes`` keep their current values.
    """
    verify_collectively(ckpt_dir)
    sharded = model.sharded_state_dict()
    skipped = {key for key in sharded if key.startswith(skip_prefixes)} if skip_prefixes else set()
    state = dist_checkpointing.load({k: v for k, v in sharded.items() if k not in skipped},
                                    str(Path(ckpt_dir) / WEIGHTS_SUBDIR))
    state.update({key: model.state_dict()[key] for key in skipped})
    model.load_state_dict(state)


def checkpoint_verification() -> str:
    """How loads check a checkpoint against its manifest: ``hash`` (default: sizes and SHA-256), ``size``, or
    ``off``, from the environment variable MEGATRON_SAVE_VERIFY."""
    mode = os.environ.get(VERIFY_ENV, "hash")
    if mode not in ("hash", "size", "off"):
        raise ValueError(f"{VERIFY_ENV}={mode!r}: expected hash, size or off")
    return mode


def predates_manifests(ckpt_dir: str | Path) -> tuple[bool, str]:
    """Whether the checkpoint's recorded format is older than manifests (format_version 1 with no megatron_core:
    megatron-save recorded the megatron-core release only after it wrote manifests), and the record that says so."""
    meta_path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        version, core = meta.get("format_version", 1), meta.get("megatron_core")
        old = version < 2 and core is None
    except (OSError, ValueError, AttributeError, TypeError):
        return False, f"{meta_path} is unreadable"
    return old, f"{meta_path} records format_version {version}" + (f" and megatron_core {core}" if core else "")


def verify_collectively(root: str | Path, mode: str | None = None) -> None:
    """Collective: rank 0 checks ``root`` against its manifest (``mode``, default checkpoint_verification());
    every rank raises CorruptCheckpointError naming the first bad file if it fails, or naming manifest.json when
    it is missing from a checkpoint whose format has one. Only a checkpoint of a format older than manifests loads
    without one (with a warning).

    A verification is remembered by the checkpoint's files' sizes and mtimes (a policy, its reference and the PRM
    often share one checkpoint): a file changed since is verified again."""
    mode = mode or checkpoint_verification()
    if mode == "off":
        return
    error = [None]
    key = None
    if dist.get_rank() == 0:
        try:
            key = (str(Path(root).resolve()), mode, tree_fingerprint(Path(root), CHECKPOINT_PARTS))
            if key not in _verified:
                old, record = predates_manifests(root)
                if missing_manifest(Path(root), old, record):
                    logger.warning("%s has no %s (%s, written by an older megatron-save): loaded unverified", root,
                                   MANIFEST_FILE, record)
                else:
                    verify_manifest(Path(root), hashes=mode == "hash", parts=CHECKPOINT_PARTS)
                _verified.add(key)
        except CorruptCheckpointError as caught:
            error = [str(caught)]
        except OSError as caught:  # every rank must hear of it, or the others wait in the broadcast
            error = [f"{root}: cannot be read ({caught})"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CorruptCheckpointError(error[0])


def build_model_from_checkpoint(
    ckpt_dir: str | Path,
    dtype: str | None = None,
    spec_backend: str = "auto",
    add_value_head: bool = False,
    recompute: RecomputeSettings | None = None,
    recompute_name: str = "recompute",
) -> tuple[Any, CheckpointMeta, Any]:
    """Builds this rank's stage under the current parallel state and loads the checkpoint into it.

    ``add_value_head`` gives a reward model saved without a value head a zero-initialised one (stage 2); the
    returned meta then says it has one. ``recompute``: activation recompute of a model that will train (setting
    ``recompute_name``), see ``build_model``.
    """
    meta, hf_config = read_checkpoint_meta(ckpt_dir)
    if add_value_head and meta.kind != "reward_model":
        raise ValueError(f"{ckpt_dir}: add_value_head needs a reward model, the checkpoint holds a {meta.kind}")
    fresh_value_head = add_value_head and not meta.value_head
    value_head = meta.value_head or add_value_head
    model = build_model(hf_config, meta.kind, dtype or meta.dtype, spec_backend, value_head=value_head,
                        recompute=recompute, recompute_name=recompute_name)
    if fresh_value_head and model.post_process:
        torch.nn.init.zeros_(model.output_layer.value_head.weight)
    load_model_checkpoint(model, ckpt_dir, skip_prefixes=(VALUE_HEAD_PREFIX,) if fresh_value_head else ())
    return model, replace(meta, value_head=value_head), hf_config
