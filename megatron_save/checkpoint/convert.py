"""Hugging Face <-> Megatron conversion, in a world of one process or under torchrun at a TP / PP / EP layout.

HF -> Megatron: each rank builds its stage of the model at the layout, reads from the safetensors shards only the
tensors of its own layers and experts (one at a time), keeps its tensor-parallel part of each and saves with
dist_checkpointing, which reshards on load to any layout. Megatron -> HF: each rank loads its shard of the
checkpoint, the full HF tensors are gathered one at a time (``gather_hf_state``) and rank 0 writes them into
safetensors shards as they fill, with the config and tokenizer copied along. A rank's host memory is therefore its
part of the model (about 1 / (TP x PP) of it, experts 1 / EP) plus one full tensor, and on export rank 0's one
output shard; ``tools/bench_conversion_memory.py`` measures it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import copy
import json
import tempfile

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR, param_mappings
from megatron_save.checkpoint.hf.gather import (
    full_shape,
    gather_hf_state,
    local_expert_count,
    rank_global_name,
    tensor_parallel_shard,
)
from megatron_save.checkpoint.model_checkpoint import (
    HF_SUBDIR,
    CheckpointMeta,
    build_model_from_checkpoint,
    copy_hf_side_files,
    ensure_new_dir,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megatron_save.checkpoint.safetensors_io import SafetensorsReader, write_sharded_safetensors
from megatron_save.config.parallel import ParallelConfig
from megatron_save.distributed import init_distributed
from megatron_save.models.builder import ModelKind, build_model
from megatron_save.models.gpt_config import model_shape
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
    parallel: ParallelConfig | None = None,
) -> CheckpointMeta:
    """Converts a Llama / Qwen2 / Qwen3 causal LM or single-label reward model to a Megatron checkpoint.

    A reward model whose directory holds ``VALUE_HEAD_FILE`` keeps its value head; ``add_value_head`` gives a
    reward model without one a zero-initialised value head (to be fitted by stage 2). ``as_reward_model`` makes
    a reward model of a causal LM: its backbone, a fresh reward head drawn from N(0, ``reward_head_std``) with
    ``seed`` (default std: the config's ``initializer_range``, as ``*ForSequenceClassification`` initialises it)
    and a zero value head; the checkpoint's config then describes the ``*ForSequenceClassification`` model.

    Collective under torchrun: ``parallel`` is the layout the ranks convert at (default TP = PP = EP = 1).
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
    init_distributed(parallel or ParallelConfig(), model_shape(target_config, str(hf_dir)))
    out_dir = _new_output_dir(out_dir)
    model = build_model(target_config, kind, meta.dtype, SpecBackend.LOCAL, value_head=value_head)
    if value_head and not has_value_head and model.post_process:
        torch.nn.init.zeros_(model.output_layer.value_head.weight)
    if as_reward_model:
        if model.post_process:
            _init_reward_head(model, hf_config.initializer_range if reward_head_std is None else reward_head_std,
                              seed)
        mappings = [m for m in param_mappings(family, target_config, True) if m.megatron != _REWARD_HEAD]
    else:
        mappings = param_mappings(family, hf_config, reward_model, has_value_head)
    reader = SafetensorsReader(hf_dir, side_files=(VALUE_HEAD_FILE,) if has_value_head else ())
    _check_every_hf_tensor_used(reader, mappings, hf_config, fresh_heads=as_reward_model)
    _load_hf_weights(model, reader, mappings, hf_config, fresh_heads=as_reward_model)
    with tempfile.TemporaryDirectory() as side_files:
        copy_hf_side_files(hf_dir, side_files)
        target_config.to_json_file(Path(side_files) / "config.json")
        save_model_checkpoint(model, out_dir, meta, side_files)
    if dist.get_rank() == 0:
        logger.info("wrote %s %s checkpoint (%s%s) to %s%s", family.name, kind.value, meta.dtype,
                    ", value head" if value_head else "", out_dir,
                    f", a fresh reward head on {hf_dir}'s backbone" if as_reward_model else "")
    return meta


def _new_output_dir(path: str | Path) -> Path:
    """Collective: every rank checks that ``path`` is new or empty before rank 0 creates it."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    dist.barrier()
    if dist.get_rank() == 0:
        ensure_new_dir(path)
    dist.barrier()
    return path


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


def _check_every_hf_tensor_used(reader: SafetensorsReader, mappings: list, hf_config: Any,
                                fresh_heads: bool) -> None:
    """Refuses an HF tensor the model does not use (other than a causal LM's output layer, when ``fresh_heads``
    puts a reward head in its place), before any rank reads a weight."""
    used = {name for mapping in mappings for name in mapping.hf}
    ignorable = {"lm_head.weight"} if hf_config.tie_word_embeddings or fresh_heads else set()
    unused = sorted(n for n in reader.names() - used - ignorable if not n.endswith(_DERIVED_HF_TENSORS))
    if unused:
        raise ConversionError(f"{reader.model_dir}: tensors the model does not use: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}")


def _load_hf_weights(model: Any, reader: SafetensorsReader, mappings: list, hf_config: Any,
                     fresh_heads: bool = False) -> None:
    """Copies this rank's part of every HF tensor its stage uses into ``model``, reading only the tensors of its
    own layers and experts, one mapping at a time; refuses a parameter without a source (other than the heads a
    conversion initialises itself)."""
    by_name = {m.megatron: m for m in mappings}
    if hf_config.tie_word_embeddings and "embedding.word_embeddings.weight" in by_name:
        # The last pipeline stage's copy of tied embeddings (a replica that dist_checkpointing does not save).
        by_name.setdefault("output_layer.weight", by_name["embedding.word_embeddings.weight"])
    fresh = {"output_layer.value_head.weight", *((_REWARD_HEAD,) if fresh_heads else ())} - set(by_name)
    offset, local_experts = get_transformer_layer_offset(model.config), local_expert_count(model)
    params = [(rank_global_name(name, offset, local_experts), name, param)
              for name, param in model.named_parameters()]
    unmapped = sorted(g for g, _, _ in params if g not in by_name and g not in fresh)
    if unmapped:
        raise ConversionError(f"Megatron parameters with no HF source: {unmapped}")
    to_load = [entry for entry in params if entry[0] in by_name]
    for global_name, name, param in tqdm(to_load, desc="HF -> Megatron", unit="tensor",
                                         disable=dist.get_rank() != 0):
        mapping = by_name[global_name]
        value = mapping.merge([reader.get(hf_name) for hf_name in mapping.hf])
        if tuple(value.shape) != full_shape(name, param):
            raise ConversionError(
                f"{reader.model_dir}: {', '.join(mapping.hf)} give shape {tuple(value.shape)} but the config "
                f"implies {full_shape(name, param)} for {global_name}"
            )
        with torch.no_grad():
            param.copy_(tensor_parallel_shard(name, value, param))


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
                           parallel: ParallelConfig | None = None) -> Path:
    """Writes a Megatron checkpoint as an HF model directory that ``from_pretrained`` loads.

    A value head goes to the side file ``VALUE_HEAD_FILE`` next to the HF weights. Collective under torchrun:
    ``parallel`` is the layout the ranks load the checkpoint at (default TP = PP = EP = 1); rank 0 writes.
    """
    _, hf_config = read_checkpoint_meta(ckpt_dir)
    init_distributed(parallel or ParallelConfig(), model_shape(hf_config, str(ckpt_dir)))
    out_dir = _new_output_dir(out_dir)
    model, meta, hf_config = build_model_from_checkpoint(ckpt_dir, spec_backend=SpecBackend.LOCAL)
    family = family_for(hf_config)
    reward_model = meta.kind == ModelKind.REWARD_MODEL.value
    writer = dist.get_rank() == 0
    count = sum(len(m.hf) for m in param_mappings(family, hf_config, reward_model, meta.value_head))
    gathered = tqdm(gather_hf_state(model, family, hf_config), total=count, desc="Megatron -> HF", unit="tensor",
                    disable=not writer)
    value_head: list[torch.Tensor] = []
    weights = _set_aside(gathered, VALUE_HEAD_TENSOR, value_head)
    if writer:
        write_sharded_safetensors(weights, out_dir, max_shard_bytes)
    else:
        for _ in weights:  # the gather is collective: every rank walks it
            pass
    if writer:
        _write_hf_side_files(ckpt_dir, out_dir, family, reward_model, value_head)
    dist.barrier()
    return out_dir


def _set_aside(tensors: Iterator[tuple[str, torch.Tensor]], name: str,
               kept: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` without the one called ``name``, which goes to ``kept``."""
    for tensor_name, tensor in tensors:
        if tensor_name == name:
            kept.append(tensor.detach().clone())
        else:
            yield tensor_name, tensor


def _write_hf_side_files(ckpt_dir: str | Path, out_dir: Path, family: DecoderFamily, reward_model: bool,
                         value_head: list[torch.Tensor]) -> None:
    """The value head's side file, the config and tokenizer files, and ``architectures`` where the config lacks it."""
    if value_head:
        save_file({VALUE_HEAD_TENSOR: value_head[0].contiguous()}, out_dir / VALUE_HEAD_FILE,
                  metadata={"format": "pt"})
    copy_hf_side_files(Path(ckpt_dir) / HF_SUBDIR, out_dir)
    # The class follows from what the checkpoint holds: a config without ``architectures`` (transformers' GGUF
    # loader writes none) still exports as a model that the Auto classes and this converter recognise.
    architecture = family.reward_model_architecture if reward_model else family.causal_lm_architecture
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):
        config["architectures"] = [architecture]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("wrote HF %s%s to %s", architecture, " + value head" if value_head else "", out_dir)
