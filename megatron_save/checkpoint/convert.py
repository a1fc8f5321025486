"""Hugging Face <-> Megatron conversion, in a world of one process or under torchrun.

HF -> Megatron, at a TP / PP / EP layout: each rank builds its stage of the model, reads from the safetensors
shards only the tensors of its own layers and experts (one at a time), keeps its tensor-parallel part of each and
saves with dist_checkpointing, which reshards on load to any layout; a rank holds its part of the model (about
1 / (TP x PP), experts 1 / EP) plus one full tensor. Megatron -> HF, under two or more processes: the model's parts
(embedding, each layer, final norm, heads) are loaded one at a time by the ranks in turn, and each rank writes its
own safetensors shards as they fill; a rank holds one part plus one output shard. ``tools/bench_conversion_memory.py``
measures both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import copy
import json
import os
import tempfile

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR, param_mappings
from megatron_save.checkpoint.hf.gather import (
    full_shape,
    local_expert_count,
    rank_global_name,
    tensor_parallel_shard,
)
from megatron_save.checkpoint.model_checkpoint import (
    HF_SUBDIR,
    WEIGHTS_SUBDIR,
    CheckpointMeta,
    build_model_from_checkpoint,
    copy_hf_side_files,
    ensure_new_dir,
    read_checkpoint_meta,
    save_model_checkpoint,
    verify_collectively,
)
from megatron_save.checkpoint.safetensors_io import SafetensorsReader, ShardFile, name_shards, write_shard_files
from megatron_save.config.parallel import ParallelConfig
from megatron_save.distributed import init_distributed
from megatron_save.models.builder import ModelKind, build_model
from megatron_save.models.gpt_config import model_shape
from megatron_save.models.families import DecoderFamily, family_for, is_reward_model
from megatron_save.models.spec import SpecBackend, local_parameter_name
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
    and a zero value head; the checkpoint's config then describes the ``*ForSequenceClassification`` model, its
    pad token chosen by ``reward_model_config`` (the reward is read at the last token that is not the pad token).

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
    target_config = (reward_model_config(family, hf_config, _tokenizer_pad_id(hf_dir)) if as_reward_model
                     else hf_config)
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
        if kind is ModelKind.REWARD_MODEL:
            logger.info("as transformers' %s does, %s", family.reward_model_architecture, _pad_rule(target_config))
    return meta


def _new_output_dir(path: str | Path) -> Path:
    """Collective: every rank checks that ``path`` is new or empty (creating it) before any rank writes."""
    path = ensure_new_dir(path)
    dist.barrier()
    return path


def _init_reward_head(model: Any, std: float, seed: int) -> None:
    """Draws the reward head [1, H] from N(0, std) with its own generator, so the draw depends on ``seed`` only."""
    head = model.output_layer.reward_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)) * std)


def reward_model_config(family: DecoderFamily, causal_lm_config: Any, tokenizer_pad_id: int | None = None) -> Any:
    """The config of the single-label ``*ForSequenceClassification`` model on a causal LM's backbone.

    Its pad token decides where the reward is read, by transformers and by our Megatron model alike: at a
    sequence's last token that is not the pad token. It is the causal LM's own ``pad_token_id`` when set, else the
    tokenizer's pad token (``tokenizer_pad_id``), else the end-of-sequence token (the first, when several); with
    pad = EOS a sequence that ends in EOS is read at the token before its trailing EOS.
    """
    config = copy.deepcopy(causal_lm_config)
    config.architectures = [family.reward_model_architecture]
    config.num_labels = 1
    if getattr(config, "pad_token_id", None) is None:
        eos = config.eos_token_id
        config.pad_token_id = tokenizer_pad_id if tokenizer_pad_id is not None else (
            eos[0] if isinstance(eos, (list, tuple)) else eos)
    return config


def _tokenizer_pad_id(hf_dir: Path) -> int | None:
    """The pad token id of the tokenizer in ``hf_dir``; None when it has none or there is no tokenizer."""
    from transformers import AutoTokenizer

    if not any((hf_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None  # AutoTokenizer would make up a default tokenizer of the model type, pad token included
    try:
        return AutoTokenizer.from_pretrained(hf_dir).pad_token_id
    except (OSError, ValueError, TypeError):
        return None


def _pad_rule(config: Any) -> str:
    """Where a reward model reads its reward, in words, for the conversion log."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    if config.pad_token_id is None:
        return "rewards are read at each sequence's last token"
    same = " (the end-of-sequence token: a sequence ending in EOS is read before it)" if config.pad_token_id in eos \
        else ""
    return f"rewards are read at each sequence's last token that is not pad_token_id={config.pad_token_id}{same}"


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
    params = [(local_parameter_name(rank_global_name(name, offset, local_experts)), name, param)
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


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes a Megatron checkpoint as an HF model directory that ``from_pretrained`` loads.

    A value head goes to the side file ``VALUE_HEAD_FILE`` next to the HF weights. In a world of one the model is
    loaded whole. Under torchrun with two or more processes the export streams: the ranks take turns over the
    model's parts (the embedding, each layer, the final norm, the heads), each loading one part at a time and
    writing its own shards as they fill, so a process holds at most one layer plus one output shard whatever the
    model's depth. (megatron-core 0.16 cannot load part of a checkpoint in a world of one: its torch_dist loader
    then places every other shard of a tensor on rank 0 as well.)
    """
    meta, hf_config = read_checkpoint_meta(ckpt_dir)
    streamed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Streamed parts live in host memory: their collectives run on gloo, on GPU machines too.
    init_distributed(ParallelConfig(backend="gloo" if streamed else "auto"), model_shape(hf_config, str(ckpt_dir)))
    out_dir = _new_output_dir(out_dir)
    family = family_for(hf_config)
    reward_model = meta.kind == ModelKind.REWARD_MODEL.value
    mappings = {m.megatron: m for m in param_mappings(family, hf_config, reward_model, meta.value_head)}
    tensors = _streamed_parts(ckpt_dir, meta, hf_config) if streamed else _whole_model(ckpt_dir)
    value_head: list[torch.Tensor] = []
    weights = _set_aside(_hf_tensors(tensors, mappings), VALUE_HEAD_TENSOR, value_head)
    shards = write_shard_files(weights, out_dir, max_shard_bytes, prefix=f"rank{dist.get_rank():05d}-")
    if value_head:  # on the rank that loaded the heads
        save_file({VALUE_HEAD_TENSOR: value_head[0].contiguous()}, out_dir / VALUE_HEAD_FILE,
                  metadata={"format": "pt"})
    every_rank: list[list[ShardFile]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every_rank, shards)
    if dist.get_rank() == 0:
        name_shards([shard for rank_shards in every_rank for shard in rank_shards], out_dir)
        _write_hf_side_files(ckpt_dir, out_dir, family, reward_model, meta.value_head)
    dist.barrier()
    return out_dir


def _whole_model(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, tensor) of every parameter of the checkpoint's model, loaded whole at TP = PP = 1."""
    model, _, _ = build_model_from_checkpoint(ckpt_dir, spec_backend=SpecBackend.LOCAL)
    for name, param in tqdm(list(model.named_parameters()), desc="Megatron -> HF", unit="tensor"):
        yield name, param.detach()


def _model_parts(model: Any) -> list[str]:
    """Names of the submodules that together hold every parameter once: each decoder layer, and every other
    top-level piece with parameters (embedding, final norm, output layer or scalar heads)."""
    def has_params(module: Any) -> bool:
        return next(module.parameters(), None) is not None

    parts = []
    for name, child in model.named_children():
        if name == "decoder":
            parts += [f"decoder.layers.{i}" for i in range(len(child.layers))]
            parts += [f"decoder.{n}" for n, c in child.named_children() if n != "layers" and has_params(c)]
        elif has_params(child):
            parts.append(name)
    covered = [f"{part}.{name}" for part in parts for name, _ in model.get_submodule(part).named_parameters()]
    if sorted(covered) != sorted(name for name, _ in model.named_parameters()):
        raise ConversionError(f"the model's parts {parts} do not hold each of its parameters exactly once")
    return parts


def _streamed_parts(ckpt_dir: str | Path, meta: CheckpointMeta, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: (Megatron name, tensor) of the parameters of this rank's parts, one part in memory at a time.

    The model is built on the meta device; a part gets real storage (``to_empty``) just before dist_checkpointing
    loads its shards, and gives it back after its tensors are handed on. Every rank calls load once per round,
    with an empty request once it has no part left.
    """
    verify_collectively(ckpt_dir)
    model = build_model(hf_config, meta.kind, meta.dtype, SpecBackend.LOCAL, value_head=meta.value_head,
                        on_meta_device=True)
    parts = _model_parts(model)
    mine = parts[dist.get_rank()::dist.get_world_size()]
    rounds = -(-len(parts) // dist.get_world_size())
    weights_dir = str(Path(ckpt_dir) / WEIGHTS_SUBDIR)
    for index in tqdm(range(rounds), desc="Megatron -> HF", unit="part", disable=dist.get_rank() != 0):
        part = mine[index] if index < len(mine) else None
        request = {}
        if part is not None:
            module = model.get_submodule(part)
            module.to_empty(device="cpu")
            request = {key: value for key, value in model.sharded_state_dict().items()
                       if key.startswith(part + ".") and isinstance(value, (ShardedTensor, ShardedTensorFactory))}
        # validate_access_integrity=False: a partial request covers only some shards of each tensor.
        state = dist_checkpointing.load(request, weights_dir, validate_access_integrity=False)
        if part is not None:
            for name, _ in module.named_parameters(prefix=part):
                yield name, state[name]
            module.to_empty(device="meta")


def _hf_tensors(tensors: Iterator[tuple[str, torch.Tensor]], mappings: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron (name, tensor) of either layer spec -> the HF (name, tensor) pairs the family's mapping splits it
    into."""
    for name, tensor in tensors:
        mapping = mappings.get(local_parameter_name(name))
        if mapping is None:
            raise ConversionError(f"Megatron parameter {name} has no HF counterpart in the mapping")
        yield from zip(mapping.hf, mapping.split(tensor))


def _set_aside(tensors: Iterator[tuple[str, torch.Tensor]], name: str,
               kept: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` without the one called ``name``, which goes to ``kept``."""
    for tensor_name, tensor in tensors:
        if tensor_name == name:
            kept.append(tensor.detach().clone())
        else:
            yield tensor_name, tensor


def _write_hf_side_files(ckpt_dir: str | Path, out_dir: Path, family: DecoderFamily, reward_model: bool,
                         value_head: bool) -> None:
    """The config and tokenizer files, and ``architectures`` where the config lacks it."""
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
