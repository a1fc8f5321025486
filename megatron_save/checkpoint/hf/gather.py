"""Full Hugging Face tensors from a TP / PP / EP sharded Megatron model, one tensor at a time, on every rank, and
the inverse: this rank's shard of a full tensor.

Gathering is the weight-sync path of rollout engines (update_weights) and of parity checks: tensor-parallel
shards are all-gathered along their partition dimension, each expert-parallel rank's experts over the
expert-parallel group, pipeline stages broadcast their layers in turn, and the family's mapping turns Megatron
tensors into HF ones. Sharding is the import from HF: each rank cuts its part out of the full tensors of its own
layers and experts.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_save.checkpoint.hf.common import param_mappings
from megatron_save.models.families import DecoderFamily
from megatron_save.models.reward_model import RewardGPTModel
from megatron_save.models.spec import local_parameter_name

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_SWIGLU_FC1 = "linear_fc1.weight"  # a dense MLP's and each expert's


_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def _is_expert(name: str) -> bool:
    return _LOCAL_EXPERT.search(name) is not None


def _tensor_parallel_group(name: str) -> Any:
    """The group a parameter is tensor-parallel sharded over: expert-tensor-parallel for experts, else TP."""
    if _is_expert(name):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _gather_tensor_parallel(name: str, param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (a replicated one as it is)."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    group = _tensor_parallel_group(name)
    if dist.get_world_size(group) == 1:
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, param.detach().contiguous(), group=group)
    if name.endswith(_SWIGLU_FC1):
        # Each rank holds [gate_r; up_r]: the full tensor is [gate_0; gate_1; ...; up_0; up_1; ...].
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=param.partition_dim)


def tensor_parallel_shard(name: str, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter's full tensor (the inverse of ``_gather_tensor_parallel``)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    group = _tensor_parallel_group(name)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if name.endswith(_SWIGLU_FC1):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=param.partition_dim)[rank]


def _full_tensors(name: str, param: torch.Tensor) -> list[torch.Tensor]:
    """Collective: the full tensor of a parameter, or for a local expert the full tensors of that local index on
    every expert-parallel rank (EP rank order), gathered over the expert-parallel group."""
    tensor = _gather_tensor_parallel(name, param).contiguous()
    if not _is_expert(name) or parallel_state.get_expert_model_parallel_world_size() == 1:
        return [tensor]
    copies = [torch.empty_like(tensor) for _ in range(parallel_state.get_expert_model_parallel_world_size())]
    dist.all_gather(copies, tensor, group=parallel_state.get_expert_model_parallel_group())
    return copies


def _with_layer_offset(name: str, layer_offset: int) -> str:
    """A pipeline stage's local layer index -> the model's layer index."""
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def _global_names(name: str, layer_offset: int, local_experts: int) -> list[str]:
    """Local layer index of this pipeline stage -> the model's layer index; a local expert index -> the model's
    expert indices of that local slot on every expert-parallel rank (as ``_full_tensors`` returns them)."""
    name = _with_layer_offset(name, layer_offset)
    match = _LOCAL_EXPERT.search(name)
    if match is None:
        return [name]
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    local = int(match.group(1))
    return [_LOCAL_EXPERT.sub(f".mlp.experts.local_experts.{rank * local_experts + local}.", name)
            for rank in range(ep_size)]


def rank_global_name(name: str, layer_offset: int, local_experts: int) -> str:
    """A parameter's name on this rank -> its name in the whole model (layer index past this stage's offset, local
    expert index past this expert-parallel rank's first expert)."""
    name = _with_layer_offset(name, layer_offset)
    first_expert = parallel_state.get_expert_model_parallel_rank() * local_experts
    return _LOCAL_EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + first_expert}.", name)


def local_expert_count(model: Any) -> int:
    """Experts of each MoE layer held by this expert-parallel rank (0 for a dense model)."""
    return (model.config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()


def unwrap(model: Any) -> Any:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def gather_megatron_state(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over the TP, EP and PP groups: (global Megatron name, full tensor) for every parameter of the
    model, stage after stage and one tensor at a time, on every rank of this model-parallel group."""
    model = unwrap(model)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    offset = get_transformer_layer_offset(model.config)
    local_experts = local_expert_count(model)
    params = list(model.named_parameters())
    device = params[0][1].device
    for source in pp_ranks:
        is_source = dist.get_rank() == source
        header = [None]
        if is_source:
            header = [[(_global_names(name, offset, local_experts), full_shape(name, param), param.dtype)
                       for name, param in params]]
        dist.broadcast_object_list(header, src=source, group=pp_group)
        for index, (names, shape, dtype) in enumerate(header[0]):
            if is_source:
                tensors = _full_tensors(*params[index])
            else:
                tensors = [torch.empty(shape, dtype=dtype, device=device) for _ in names]
            for name, tensor in zip(names, tensors):
                if len(pp_ranks) > 1:
                    dist.broadcast(tensor, src=source, group=pp_group)
                yield name, tensor


def full_shape(name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape of a (possibly TP-sharded) parameter's full tensor."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= dist.get_world_size(_tensor_parallel_group(name))
    return tuple(shape)


def gather_hf_state(model: Any, family: DecoderFamily, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: (HF name, full tensor) of every HF weight (for update_weights of a rollout engine, or export).

    The model may be of either layer spec (Transformer Engine's fused norm names are translated by
    ``local_parameter_name``). A reward model's value head comes out as ``VALUE_HEAD_TENSOR``; a parameter the
    family's mapping does not know raises, except the last stage's copy of tied embeddings.
    """
    inner = unwrap(model)
    reward_model = isinstance(inner, RewardGPTModel)
    mappings = {m.megatron: m for m in param_mappings(family, hf_config, reward_model,
                                                      reward_model and inner.has_value_head)}
    for name, tensor in gather_megatron_state(inner):
        mapping = mappings.get(local_parameter_name(name))
        if mapping is None:
            if name == "output_layer.weight" and hf_config.tie_word_embeddings:
                continue
            raise KeyError(f"gather_hf_state: Megatron parameter {name} has no HF counterpart in the {family.name} "
                           "mapping")
        yield from zip(mapping.hf, mapping.split(tensor))
