"""Hugging Face <-> Megatron conversion, run in a world of one process on CPU.

HF -> Megatron streams tensors from the safetensors shards into a TP=1, PP=1 Megatron model and saves it with
dist_checkpointing, which reshards on load to any TP / PP. Megatron -> HF loads the checkpoint at TP=1, PP=1 and
writes safetensors shards that ``from_pretrained`` reads, with the config and tokenizer copied along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import copy
import json
import tempfile

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
from megatron_save.models.families import DecoderFamily, family_for, is_reward_model
from megatron_save.models.spec import SpecBackend
from megatron_save.utils.logging import get_logger

logger = get_logger(__name__)

# HF tensors that carry no weights of their own.
_DERIVED_HF_TENSORS = ("rotary_emb.inv_freq",)
_REWARD_HEAD = "output_layer.reward_head.weight"
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
    hf_model: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    add_value_head: bool = False,
    as_reward_model: bool = False,
    reward_head_std: float | None = None,
    seed: int = 0,
) -> CheckpointMeta:
    """Converts a Llama / Qwen2 / Qwen3 causal LM or single-label reward model to a Megatron checkpoint.

    A reward model whose directory holds ``VALUE_HEAD_FILE`` keeps its value head; ``add_value_head`` gives a
    reward model without one a zero-initialised value head (to be fitted by stage 2). ``as_reward_model`` makes
    a reward model of a causal LM: its backbone, a fresh reward head drawn from N(0, ``reward_head_std``) with
    ``seed`` (default std: the config's ``initializer_range``, as ``*ForSequenceClassification`` initialises it)
    and a zero value head; the checkpoint's config then describes the ``*ForSequenceClassification`` model.
    """
    hf_dir = resolve_hf_dir(hf_model)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    family = family_for(hf_config)
    reward_model = is_reward_model(family, hf_config)
    if as_reward_model and reward_model:
        raise ValueError(f"{hf_dir}: as_reward_model needs a causal LM; this is already a reward model "
                         f"({family.reward_model_architecture})")
    has_value_head = (hf_dir / VALUE_HEAD_FILE).exists()
    if add_value_head and (has_value_head or not reward_model):
        raise ValueError(f"{hf_dir}: add_value_head needs a reward model without {VALUE_HEAD_FILE}"
                         f"{'; use as_reward_model for a causal LM' if not reward_model else ''}")
    target_config = reward_model_config(family, hf_config) if as_reward_model else hf_config
    kind = ModelKind.REWARD_MODEL if reward_model or as_reward_model else ModelKind.CAUSAL_LM
    value_head = has_value_head or add_value_head or as_reward_model
    meta = CheckpointMeta(family.name, kind.value, dtype or _default_dtype(hf_config), value_head)
    out_dir = ensure_new_dir(out_dir)
    init_distributed(ParallelConfig())
    model = build_model(target_config, kind, meta.dtype, SpecBackend.LOCAL, value_head=value_head)
    if value_head and not has_value_head:
        torch.nn.init.zeros_(model.output_layer.value_head.weight)
    if as_reward_model:
        _init_reward_head(model, hf_config.initializer_range if reward_head_std is None else reward_head_std, seed)
        mappings = [m for m in param_mappings(family, target_config, True) if m.megatron != _REWARD_HEAD]
    else:
        mappings = param_mappings(family, hf_config, reward_model, has_value_head)
    reader = SafetensorsReader(hf_dir, side_files=(VALUE_HEAD_FILE,) if has_value_head else ())
    _load_hf_weights(model, reader, mappings, hf_config, fresh_heads=as_reward_model)
    with tempfile.TemporaryDirectory() as side_files:
        copy_hf_side_files(hf_dir, side_files)
        target_config.to_json_file(Path(side_files) / "config.json")
        save_model_checkpoint(model, out_dir, meta, side_files)
    logger.info("wrote %s %s checkpoint (%s%s) to %s%s", family.name, kind.value, meta.dtype,
                ", value head" if value_head else "", out_dir,
                f", a fresh reward head on {hf_dir}'s backbone" if as_reward_model else "")
    return meta


def _init_reward_head(model: Any, std: float, seed: int) -> None:
    """Draws the reward head [1, H] from N(0, std) with its own generator, so the draw depends on ``seed`` only."""
    head = model.output_layer.reward_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)) * std)


def reward_model_config(family: DecoderFamily, causal_lm_config: Any) -> Any:
    """The config of the single-label ``*ForSequenceClassification`` model on a causal LM's backbone; its pad
    token (where the reward is read after the last real token) defaults to the end-of-sequence token."""
    config = copy.deepcopy(causal_lm_config)
    config.architectures = [family.reward_model_architecture]
    config.num_labels = 1
    if getattr(config, "pad_token_id", None) is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return config


def _load_hf_weights(model: Any, reader: SafetensorsReader, mappings: list, hf_config: Any,
                      fresh_heads: bool = False) -> None:
    """Copies every mapped HF tensor into ``model``; refuses a parameter without a source (other than the heads
    a conversion initialises itself) and an HF tensor the model does not use (other than a causal LM's output
    layer, when ``fresh_heads`` puts a reward head in its place)."""
    params = dict(model.named_parameters())
    mapped = {m.megatron for m in mappings}
    fresh = {"output_layer.value_head.weight", *((_REWARD_HEAD,) if fresh_heads else ())}
    fresh -= mapped
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
    ignorable = {"lm_head.weight"} if hf_config.tie_word_embeddings or fresh_heads else set()
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
    reward_model = meta.kind == ModelKind.REWARD_MODEL.value
    mappings = param_mappings(family, hf_config, reward_model, meta.value_head)
    params = dict(model.named_parameters())
    tensors = _hf_tensors(params, [m for m in mappings if m.hf != (VALUE_HEAD_TENSOR,)])
    write_sharded_safetensors(tensors, out_dir, max_shard_bytes)
    if meta.value_head:
        value_head = params["output_layer.value_head.weight"].detach().contiguous()
        save_file({VALUE_HEAD_TENSOR: value_head}, out_dir / VALUE_HEAD_FILE, metadata={"format": "pt"})
    copy_hf_side_files(Path(ckpt_dir) / HF_SUBDIR, out_dir)
    # The class follows from what the checkpoint holds: a config without ``architectures`` (transformers' GGUF
    # loader writes none) still exports as a model that the Auto classes and this converter recognise.
    architecture = family.reward_model_architecture if reward_model else family.causal_lm_architecture
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):
        config["architectures"] = [architecture]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("wrote HF %s%s to %s", architecture, " + value head" if meta.value_head else "", out_dir)
    return out_dir


def _hf_tensors(params: dict, mappings: list) -> Iterator[tuple[str, torch.Tensor]]:
    for mapping in tqdm(mappings, desc="Megatron -> HF", unit="tensor"):
        for name, tensor in zip(mapping.hf, mapping.split(params[mapping.megatron].detach())):
            yield name, tensor
