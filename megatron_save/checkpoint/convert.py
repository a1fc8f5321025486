"""Hugging Face <-> Megatron conversion, run in a world of one process on CPU.

HF -> Megatron streams tensors from the safetensors shards into a TP=1, PP=1 Megatron model and saves it with
dist_checkpointing, which reshards on load to any TP / PP. Megatron -> HF loads the checkpoint at TP=1, PP=1 and
writes safetensors shards that ``from_pretrained`` reads, with the config and tokenizer copied along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR, param_mappings
from megatron_save.checkpoint.model_checkpoint import (
    HF_SUBDIR,
    CheckpointMeta,
    build_model_from_checkpoint,
    copy_hf_side_files,
    ensure_new_dir,
    save_model_checkpoint,
)
from megatron_save.checkpoint.safetensors_io import SafetensorsReader, write_sharded_safetensors
from megatron_save.config.parallel import ParallelConfig
from megatron_save.distributed import init_distributed
from megatron_save.models.builder import ModelKind, build_model
from megatron_save.models.families import family_for, is_reward_model
from megatron_save.models.spec import SpecBackend
from megatron_save.utils.logging import get_logger

logger = get_logger(__name__)

# HF tensors that carry no weights of their own.
_DERIVED_HF_TENSORS = ("rotary_emb.inv_freq",)
_HF_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


class ConversionError(ValueError):
    """A checkpoint that does not fit the model its config describes; the message names the tensors."""


def resolve_hf_dir(name_or_path: str | Path) -> Path:
    """A local model directory as given, or a hub name fetched (config, tokenizer, safetensors) on clusters."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a model directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))


def _default_dtype(hf_config: Any) -> str:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return _HF_DTYPE_NAMES.get(str(dtype).removeprefix("torch."), "fp32")


def convert_hf_to_megatron(
    hf_model: str | Path, out_dir: str | Path, dtype: str | None = None, add_value_head: bool = False
) -> CheckpointMeta:
    """Converts a Llama / Qwen2 / Qwen3 causal LM or single-label reward model to a Megatron checkpoint.

    A reward model whose directory holds ``VALUE_HEAD_FILE`` keeps its value head; ``add_value_head`` gives a
    reward model without one a zero-initialised value head (to be fitted by stage 2).
    """
    hf_dir = resolve_hf_dir(hf_model)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    family = family_for(hf_config)
    reward_model = is_reward_model(family, hf_config)
    has_value_head = (hf_dir / VALUE_HEAD_FILE).exists()
    if add_value_head and (has_value_head or not reward_model):
        raise ValueError(f"{hf_dir}: add_value_head needs a reward model without {VALUE_HEAD_FILE}")
    kind = ModelKind.REWARD_MODEL if reward_model else ModelKind.CAUSAL_LM
    value_head = has_value_head or add_value_head
    meta = CheckpointMeta(family.name, kind.value, dtype or _default_dtype(hf_config), value_head)
    out_dir = ensure_new_dir(out_dir)
    init_distributed(ParallelConfig())
    model = build_model(hf_config, kind, meta.dtype, SpecBackend.LOCAL, value_head=value_head)
    if add_value_head:
        torch.nn.init.zeros_(model.output_layer.value_head.weight)
    reader = SafetensorsReader(hf_dir, side_files=(VALUE_HEAD_FILE,) if has_value_head else ())
    _load_hf_weights(model, reader, param_mappings(family, hf_config, reward_model, has_value_head), hf_config)
    save_model_checkpoint(model, out_dir, meta, hf_dir)
    logger.info("wrote %s %s checkpoint (%s%s) to %s", family.name, kind.value, meta.dtype,
                ", value head" if value_head else "", out_dir)
    return meta


def _load_hf_weights(model: Any, reader: SafetensorsReader, mappings: list, hf_config: Any) -> None:
    params = dict(model.named_parameters())
    mapped = {m.megatron for m in mappings}
    fresh = {"output_layer.value_head.weight"} - {m.megatron for m in mappings}
    unmapped = sorted(set(params) - mapped - fresh)
    if unmapped:
        raise ConversionError(f"Megatron parameters with no HF source: {unmapped}")
    used: set[str] = set()
    for mapping in tqdm(mappings, desc="HF -> Megatron", unit="tensor"):
        value = mapping.merge([reader.get(name) for name in mapping.hf])
        target = params[mapping.megatron]
        if value.shape != target.shape:
            raise ConversionError(
                f"{reader.model_dir}: {', '.join(mapping.hf)} give shape {tuple(value.shape)} but the config "
                f"implies {tuple(target.shape)} for {mapping.megatron}"
            )
        with torch.no_grad():
            target.copy_(value)
        used.update(mapping.hf)
    ignorable = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    unused = sorted(n for n in reader.names() - used - ignorable if not n.endswith(_DERIVED_HF_TENSORS))
    if unused:
        raise ConversionError(f"{reader.model_dir}: tensors the model does not use: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}")


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes a Megatron checkpoint as an HF model directory that ``from_pretrained`` loads.

    A value head goes to the side file ``VALUE_HEAD_FILE`` next to the HF weights.
    """
    out_dir = ensure_new_dir(out_dir)
    init_distributed(ParallelConfig())
    model, meta, hf_config = build_model_from_checkpoint(ckpt_dir, spec_backend=SpecBackend.LOCAL)
    family = family_for(hf_config)
    mappings = param_mappings(family, hf_config, meta.kind == ModelKind.REWARD_MODEL.value, meta.value_head)
    params = dict(model.named_parameters())
    tensors = _hf_tensors(params, [m for m in mappings if m.hf != (VALUE_HEAD_TENSOR,)])
    write_sharded_safetensors(tensors, out_dir, max_shard_bytes)
    if meta.value_head:
        value_head = params["output_layer.value_head.weight"].detach().contiguous()
        save_file({VALUE_HEAD_TENSOR: value_head}, out_dir / VALUE_HEAD_FILE, metadata={"format": "pt"})
    copy_hf_side_files(Path(ckpt_dir) / HF_SUBDIR, out_dir)
    logger.info("wrote HF %s%s to %s", hf_config.architectures[0], " + value head" if meta.value_head else "",
                out_dir)
    return out_dir


def _hf_tensors(params: dict, mappings: list) -> Iterator[tuple[str, torch.Tensor]]:
    for mapping in tqdm(mappings, desc="Megatron -> HF", unit="tensor"):
        for name, tensor in zip(mapping.hf, mapping.split(params[mapping.megatron].detach())):
            yield name, tensor
