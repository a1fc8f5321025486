"""Every refusal of distributed start-up and of conversion, with a message that names the setting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO

from megatron_save.checkpoint.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_save.config import ParallelConfig
from megatron_save.distributed import ModelShape, ParallelLayoutError, check_parallel_layout, init_distributed
from megatron_save.models.families import UnsupportedModelError
from megatron_save.testing import save_tiny_hf_model

SHAPE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=128)


def layout(tp: int, pp: int) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def test_valid_layouts_pass():
    for tp, pp, world in [(1, 1, 1), (2, 1, 2), (1, 2, 4), (2, 2, 4), (2, 2, 8)]:
        check_parallel_layout(layout(tp, pp), world, SHAPE)


def test_refuses_tp_not_dividing_heads():
    shape = ModelShape(num_layers=4, num_attention_heads=6, num_query_groups=6, vocab_size=128)
    with pytest.raises(ParallelLayoutError, match="tensor_model_parallel_size=4 does not divide the 6 attention heads"):
        check_parallel_layout(layout(4, 1), 4, shape)


def test_refuses_tp_not_dividing_query_groups():
    with pytest.raises(ParallelLayoutError, match="does not divide the 2 query groups"):
        check_parallel_layout(layout(4, 1), 4, SHAPE)


def test_refuses_pp_not_dividing_layers():
    with pytest.raises(ParallelLayoutError, match="pipeline_model_parallel_size=3 does not divide the 4 layers"):
        check_parallel_layout(layout(1, 3), 3, SHAPE)


def test_refuses_world_not_multiple_of_tp_pp():
    with pytest.raises(ParallelLayoutError, match="world size 6 is not a multiple of .* 2 x 2 = 4"):
        check_parallel_layout(layout(2, 2), 6, SHAPE)


def test_refuses_tp_not_dividing_vocab():
    shape = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=127)
    with pytest.raises(ParallelLayoutError, match="does not divide the vocabulary size 127"):
        check_parallel_layout(layout(2, 1), 2, shape)


MOE_SHAPE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, vocab_size=128, num_experts=4)


def test_expert_layouts():
    check_parallel_layout(ParallelConfig(expert_model_parallel_size=4), 4, MOE_SHAPE)
    check_parallel_layout(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                         expert_tensor_parallel_size=2), 4, MOE_SHAPE)
    check_parallel_layout(ParallelConfig(expert_model_parallel_size=2), 2, SHAPE)  # a dense model ignores it
    with pytest.raises(ParallelLayoutError, match="expert_model_parallel_size=3 does not divide the 4 experts"):
        check_parallel_layout(ParallelConfig(expert_model_parallel_size=3), 3, MOE_SHAPE)
    with pytest.raises(ParallelLayoutError, match="world size 4 is not a multiple of expert_tensor_parallel_size x "
                                                  "expert_model_parallel_size x pipeline_model_parallel_size = "
                                                  r"2 x 2 x 2 = 8"):
        check_parallel_layout(ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                                             expert_tensor_parallel_size=2), 4, MOE_SHAPE)


def test_refuses_moe_router_settings_megatron_cannot_reproduce(world_of_one):
    from megatron_save.models.families import family_for
    from megatron_save.models.gpt_config import gpt_args_from_hf
    from megatron_save.testing import tiny_hf_config

    with pytest.raises(UnsupportedModelError, match=r"mlp_only_layers=\[1\]"):
        family_for(tiny_hf_config("qwen3_moe", mlp_only_layers=[1]))
    with pytest.raises(UnsupportedModelError, match="decoder_sparse_step=2"):
        family_for(tiny_hf_config("qwen3_moe", decoder_sparse_step=2))
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=1 with norm_topk_prob=True"):
        gpt_args_from_hf(tiny_hf_config("qwen3_moe", num_experts_per_tok=1))


def test_refuses_sequence_parallel_on_the_local_spec(world_of_one, monkeypatch):
    """At TP=1 sequence parallelism has no effect; at TP > 1 (faked for this check in a world of one) the local
    spec refuses it."""
    from megatron.core import parallel_state

    from megatron_save.distributed import init
    from megatron_save.models.builder import build_model
    from megatron_save.testing import tiny_hf_config

    init.set_model_parallel(ParallelConfig(sequence_parallel=True))
    assert not build_model(tiny_hf_config("llama"), "causal_lm", spec_backend="local").config.sequence_parallel
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    with pytest.raises(ParallelLayoutError, match="sequence_parallel=true needs the Transformer Engine layer spec"):
        build_model(tiny_hf_config("llama"), "causal_lm", spec_backend="local")


def test_init_refuses_before_creating_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(torch.distributed, "init_process_group", pytest.fail)
    with pytest.raises(ParallelLayoutError, match="world size 3"):
        init_distributed(layout(2, 1), SHAPE)


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny_hf_model("llama", tmp_path / "hf")


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_refuses_unsupported_model_type(tiny_llama, tmp_path):
    _edit_config(tiny_llama, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'mistral'.*supported model types: llama"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_unsupported_architecture(tiny_llama, tmp_path):
    _edit_config(tiny_llama, architectures=["LlamaForTokenClassification"])
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'LlamaForTokenClassification'"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_multi_label_classifier(tmp_path):
    model_dir = save_tiny_hf_model("qwen2", tmp_path / "hf", reward_model=True)
    _edit_config(model_dir, id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    with pytest.raises(UnsupportedModelError, match="num_labels=2"):
        convert_hf_to_megatron(model_dir, tmp_path / "out")


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
         "low_freq_factor=2.0"),
    ],
)
def test_refuses_settings_megatron_cannot_reproduce(tiny_llama, tmp_path, changes, named):
    _edit_config(tiny_llama, **changes)
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(").replace("[", r"\[")):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_mismatched_tensor_shape(tiny_llama, tmp_path):
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"][:, :-8].clone()
    save_file(weights, tiny_llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.down_proj.weight give shape \(64, 88\) but the "
                                              r"config implies \(64, 96\) for decoder.layers.1.mlp.linear_fc2.weight"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_missing_tensor(tiny_llama, tmp_path):
    weights = load_file(tiny_llama / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, tiny_llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.2.self_attn.k_proj.weight"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_unused_tensor(tiny_llama, tmp_path):
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, tiny_llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="tensors the model does not use.*o_proj.bias"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_non_empty_output_dir(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_directory_without_safetensors(tiny_llama, tmp_path):
    (tiny_llama / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        convert_hf_to_megatron(tiny_llama, tmp_path / "out")


def test_refuses_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a megatron-save model checkpoint"):
        convert_megatron_to_hf(tmp_path / "empty", tmp_path / "hf")


def test_stage3_checks_every_model_before_any_process_group(tmp_path, monkeypatch, rl_data):
    """A reward model that PP=2 cannot split (3 layers) is refused by name before torch.distributed starts, as
    one line (SystemExit), not a traceback from inside Megatron on every rank."""
    from megatron_save.trainers.stage3 import Stage3Config, train_stage3
    from megatron_save.trainers.common import run_from_command_line

    policy = tmp_path / "policy"
    reward = tmp_path / "reward"
    convert_hf_to_megatron(save_tiny_hf_model("llama", tmp_path / "policy-hf"), policy)
    convert_hf_to_megatron(save_tiny_hf_model("llama", tmp_path / "rm-hf", reward_model=True, value_head=True,
                                              num_hidden_layers=3), reward)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", pytest.fail)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    argv = [str(REPO / "examples/cpu/stage3_save.yaml"), f"output_dir={tmp_path / 'run'}", f"policy.checkpoint={policy}",
            f"reward.checkpoint={reward}", f"train_data={rl_data['prompts']}",
            "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]
    with pytest.raises(SystemExit) as refusal:
        run_from_command_line(Stage3Config, train_stage3, "stage3", argv)
    message = str(refusal.value)
    assert message == (f"megatron_save stage3: reward.checkpoint={reward}: pipeline_model_parallel_size=2 does "
                       "not divide the 3 layers")
