"""The memory planner (megatron_save/planning/memory.py, tools/plan_memory.py) against what Megatron-Core 0.16
really allocates in this package, measured on tiny models in one process:

- weights: the bytes of the model's parameter storages (DDP's padded buffer with the distributed optimizer),
  exactly;
- gradients: the bytes of DDP's fp32 gradient buffers after a backward, exactly (padding modelled);
- optimizer: the fp32 main copies plus Adam's state tensors after one step, exactly (the per-tensor ``step``
  counters left out, as the planner documents);
- activations (``spec="local"``, unfused SwiGLU: the CPU path): the bytes of the unique storages that autograd
  saves during the forward and loss, within ACTIVATION_TOLERANCE (1%; the account comes out to the byte on
  these configs, Qwen3-MoE included; the tolerance leaves room for a routing that leaves an expert without
  tokens, and is below one [s, b, h] tensor per layer, so a tensor the account misses still fails it).

Parameter counts are checked against transformers' models of the same configs (Qwen3-MoE included), the TP / PP
/ EP division analytically, the scaling configs against their published sizes, and every examples/scaling YAML
header against the planner's current output for the command written in it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from megatron_save.planning import MemoryLayout, architecture_from_hf, plan_memory
from megatron_save.planning.memory import (
    FAMILY_FACTS,
    buffer_numel,
    stage_activation_bytes,
    stage_params,
    trained_bytes,
)
from megatron_save.testing.tiny_models import tiny_hf_config

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plan_memory.py"
SCALING = REPO / "examples" / "scaling"
ACTIVATION_TOLERANCE = 0.01
PROMPT, RESPONSE, BATCH = 12, 20, 2  # 32-token sequences, two per micro-batch


def _tool():
    spec = importlib.util.spec_from_file_location("plan_memory_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _moe_config(**overrides) -> transformers.Qwen3MoeConfig:
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])
    return transformers.Qwen3MoeConfig(**{**settings, **overrides})


# -- parameter counts -------------------------------------------------------------------------------------------

def test_family_facts_agree_with_the_model_families():
    from megatron_save.models.families import FAMILIES

    facts = {t: (f.qkv_bias, f.qk_norm) for f in FAMILIES.values() for t in f.model_types}
    assert {t: facts[t] for t in facts if t in FAMILY_FACTS} == {t: FAMILY_FACTS[t] for t in facts if t in FAMILY_FACTS}
    assert set(facts) <= set(FAMILY_FACTS), "a family the planner does not know"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("reward_model", [False, True], ids=["lm", "rm"])
def test_parameter_count_equals_transformers(family, reward_model):
    config = tiny_hf_config(family, reward_model=reward_model)
    auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    expected = sum(p.numel() for p in auto.from_config(config).parameters())
    arch = architecture_from_hf(config, reward_model=reward_model)
    assert stage_params(arch, tp=1, pp=1, stage=0).total() == expected
    if reward_model:  # the value head: one more [1, h]
        assert stage_params(arch, 1, 1, 0, value_head=True).total() == expected + config.hidden_size


@pytest.mark.parametrize("overrides, dense", [
    ({}, ()), ({"mlp_only_layers": [0, 3]}, (0, 3)), ({"decoder_sparse_step": 2}, (0, 2)),
    ({"tie_word_embeddings": True}, ())], ids=["moe", "mlp_only", "sparse_step", "tied"])
def test_moe_parameter_count_equals_transformers(overrides, dense):
    config = _moe_config(**overrides)
    expected = sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(config).parameters())
    arch = architecture_from_hf(config, reward_model=False)
    assert arch.dense_layers == dense
    assert stage_params(arch, 1, 1, 0).total() == expected


def test_causal_lm_as_reward_model_replaces_the_lm_head():
    config = tiny_hf_config("llama")
    lm, rm = architecture_from_hf(config, False), architecture_from_hf(config, True)
    head = config.vocab_size * config.hidden_size
    assert stage_params(rm, 1, 1, 0).total() == stage_params(lm, 1, 1, 0).total() - head + config.hidden_size


# -- TP / PP / EP division, analytically ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tensor_parallel_halves_the_matrices_and_keeps_the_norms(family):
    config = tiny_hf_config(family)
    arch = architecture_from_hf(config, reward_model=False)
    h, d = config.hidden_size, arch.head_dim
    replicated = config.num_hidden_layers * (2 * h + (2 * d if arch.qk_norm else 0)) + h  # norms
    one, two = stage_params(arch, 1, 1, 0).total(), stage_params(arch, 2, 1, 0).total()
    assert two == (one - replicated) // 2 + replicated
    # PP=2: the stages partition the model; a tied embedding gets a copy on the last stage.
    stages = [stage_params(arch, 1, 2, stage) for stage in (0, 1)]
    copy = config.vocab_size * h if arch.tied else 0
    assert sum(s.total() for s in stages) == one + copy
    assert sum(stages[1].shared) == copy and sum(stages[0].shared) == copy


def test_expert_parallel_splits_the_experts_and_keeps_the_router():
    arch = architecture_from_hf(_moe_config(), reward_model=False)
    one, two = stage_params(arch, 1, 1, 0, ep=1), stage_params(arch, 1, 1, 0, ep=2)
    assert sum(two.expert) * 2 == sum(one.expert) and two.dense == one.dense
    assert sum(stage_params(arch, 1, 1, 0, ep=2, etp=2).expert) * 4 == sum(one.expert)
    expert = 3 * arch.moe_ffn * arch.hidden
    assert sum(one.expert) == arch.layers * arch.num_experts * expert


def test_distributed_optimizer_padding():
    # Parameters start 64-aligned, the bucket ends on lcm(DP, 128): 100 -> 128, + 10 -> 138 -> 256.
    assert buffer_numel([[100, 10]], dp=4, distributed_optimizer=True) == 256
    assert buffer_numel([[100, 10]], dp=3, distributed_optimizer=True) == 384
    assert buffer_numel([[100, 10], [5]], dp=1, distributed_optimizer=False) == 115


def test_plan_reports_the_fullest_stage_and_sums_its_parts():
    policy = architecture_from_hf(tiny_hf_config("llama"), False)
    reward = architecture_from_hf(tiny_hf_config("qwen3", reward_model=True), True)
    layout = MemoryLayout(tp=2, pp=2, dp=2, micro_batch=2, reward_micro_batch=4, distributed_optimizer=True,
                          value_head=True, prompt_length=PROMPT, response_length=RESPONSE)
    plan = plan_memory(policy, reward, layout)
    parts = {k: v for k, v in plan.per_gpu_bytes.items() if k != "total"}
    assert plan.total == sum(parts.values())
    # 1F1B: the first stage holds PP = 2 micro-batches, the last one.
    assert stage_activation_bytes(policy, layout, 0, 2) > stage_activation_bytes(policy, layout, 1, 2)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=8 does not divide the 4 attention heads"):
        plan_memory(policy, reward, replace(layout, tp=8))
    # vLLM reserves rollout.vllm.kv_cache_memory_gib whatever the batch fills; without it the batch's need.
    vllm = replace(layout, rollout_backend="vllm")
    needed = plan_memory(policy, reward, vllm).per_gpu_bytes["rollout_kv_cache"]
    assert needed == 2 * policy.layers * max(1, policy.kv_heads // 2) * policy.head_dim * vllm.sequence * \
        vllm.rollout_batch * 2  # bf16
    reserved = plan_memory(policy, reward, replace(vllm, vllm_kv_cache_bytes=3 * 2**30))
    assert reserved.per_gpu_bytes["rollout_kv_cache"] == 3 * 2**30 and reserved.total == sum(
        v for k, v in reserved.per_gpu_bytes.items() if k != "total")


# -- against the real Megatron allocation -----------------------------------------------------------------------

def _saved_activation_bytes(model, tokens: torch.Tensor, loss_of) -> tuple[int, torch.Tensor]:
    """Bytes of the unique storages autograd saves in the forward and loss (parameters excluded), and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model(tokens, position_ids, None))
    return sum(saved.values()), loss


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distopt"])
@pytest.mark.parametrize("kind", ["lm", "rm", "rm_value"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_planned_bytes_equal_megatron_allocation(family, dtype, kind, distributed, world_of_one):
    from megatron_save.models.builder import build_model
    from megatron_save.models.families import FAMILIES
    from megatron_save.models.policy import token_logprobs
    from megatron_save.trainers.offload import optimizer_own_tensors
    from megatron_save.trainers.optimizer import OptimizerSettings, build_train_state

    if family not in FAMILIES:
        pytest.skip(f"megatron_save.models has no {family} model yet")
    reward_model, value_head = kind != "lm", kind == "rm_value"
    if family == "qwen3_moe":  # at EP=1 (a world of one) the experts share DDP's dense buffer
        head = "SequenceClassification" if reward_model else "CausalLM"
        config = _moe_config(architectures=[f"Qwen3MoeFor{head}"], **({"num_labels": 1} if reward_model else {}))
    else:
        config = tiny_hf_config(family, reward_model=reward_model)
    torch.manual_seed(0)
    model = build_model(config, "reward_model" if reward_model else "causal_lm", dtype=dtype, spec_backend="local",
                        value_head=value_head)
    state = build_train_state(model, OptimizerSettings(lr=1e-3, use_distributed_optimizer=distributed), 4)
    tokens = torch.randint(0, config.vocab_size, (BATCH, PROMPT + RESPONSE))
    if reward_model:
        loss_of = lambda scores: scores.float().sum()  # noqa: E731
    else:
        loss_of = lambda logits: -token_logprobs(logits[:, :-1], tokens[:, 1:]).sum()  # noqa: E731
    activations, loss = _saved_activation_bytes(state.model, tokens, loss_of)
    loss.backward()
    state.optimizer.step()

    arch = architecture_from_hf(config, reward_model=reward_model)
    layout = MemoryLayout(dtype=dtype, distributed_optimizer=distributed, value_head=value_head, spec="local",
                          fused_activation=False, prompt_length=PROMPT, response_length=RESPONSE)
    params = stage_params(arch, 1, 1, 0, value_head=value_head)
    planned = trained_bytes(params, layout)
    element = 4 if dtype == "fp32" else 2
    assert params.total() * element == sum(p.numel() * p.element_size() for p in model.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert planned.weights == sum(storages.values())
    buffers = [*state.model.buffers, *state.model.expert_parallel_buffers]
    assert planned.gradients == sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    main_copies, slots = optimizer_own_tensors(state)
    assert {key for _, key in slots} == {"exp_avg", "exp_avg_sq", "step"}
    optimizer = sum(p.numel() * p.element_size() for p in main_copies) + sum(
        values[key].numel() * values[key].element_size() for values, key in slots if key != "step")
    assert planned.optimizer == optimizer
    predicted = stage_activation_bytes(arch, layout, 0, BATCH)
    assert abs(predicted - activations) <= ACTIVATION_TOLERANCE * activations, (predicted, activations)


# -- published sizes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, billions", [
    ("Llama-3.1-70B-Instruct", 70.6), ("Llama-3.1-8B-Instruct", 8.03), ("Skywork-Reward-V2-Llama-3.1-8B", 7.50),
    ("Qwen3-30B-A3B", 30.5), ("Qwen3-235B-A22B", 235.1), ("Qwen3-4B", 4.02)])
def test_scaling_configs_have_their_published_sizes(name, billions):
    config = transformers.AutoConfig.from_pretrained(SCALING / "configs" / name)
    reward_model = config.architectures[0].endswith("ForSequenceClassification")
    total = stage_params(architecture_from_hf(config, reward_model), 1, 1, 0).total()
    assert abs(total / 1e9 - billions) <= 0.015 * billions, total


# -- the command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_configs")
    paths = {}
    for name, family, reward_model in (("policy", "llama", False), ("reward", "qwen3", True)):
        tiny_hf_config(family, reward_model=reward_model).save_pretrained(root / name)
        paths[name] = root / name / "config.json"
    return paths


def test_cli_json_total_is_the_sum_of_its_parts(tiny_configs):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--policy", str(tiny_configs["policy"]), "--reward", str(tiny_configs["reward"]),
         "--tp", "2", "--pp", "2", "--dp", "2", "--dtype", "bf16", "--micro-batch", "2", "--value-head",
         "--distributed-optimizer", "--offload-optimizer", "--rollout-backend", "megatron", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"per_gpu_bytes", "layout"}
    parts = out["per_gpu_bytes"]
    assert all(isinstance(value, int) for value in parts.values())
    assert parts.pop("total") == sum(parts.values())
    assert {"policy_weights", "policy_gradients", "policy_optimizer_states", "policy_activations",
            "reference_weights", "reward_weights", "reward_gradients", "reward_optimizer_states",
            "reward_activations", "rollout_kv_cache"} <= set(parts)
    assert "rollout_weights" not in parts  # the megatron backend samples from the policy itself
    assert parts["policy_optimizer_states"] == 0 < parts["offload_restored"]
    assert (out["layout"]["tp"], out["layout"]["pp"], out["layout"]["dp"]) == (2, 2, 2)
    vllm = subprocess.run(
        [sys.executable, str(TOOL), "--policy", str(tiny_configs["policy"]), "--reward", str(tiny_configs["reward"]),
         "--rollout-backend", "vllm", "--vllm-kv-cache-gib", "0.5", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert vllm.returncode == 0, vllm.stderr
    assert json.loads(vllm.stdout)["per_gpu_bytes"]["rollout_kv_cache"] == 2**29


def test_cli_lists_the_layouts_that_fit_smallest_model_parallel_first(tiny_configs):
    common = ["--policy", str(tiny_configs["policy"]), "--reward", str(tiny_configs["reward"]), "--gpus", "4"]
    status, lines = _tool().run([*common, "--gpu-memory", "1GiB"])
    assert status == 0, lines
    rows = [[int(x) for x in line.split()[:4]] for line in lines[2:]]
    assert rows and all(tp * pp * dp == 4 for tp, pp, ep, dp in rows)
    sizes = [tp * pp * ep for tp, pp, ep, dp in rows]
    assert sizes == sorted(sizes) and (1, 1, 1, 4) == tuple(rows[0]), rows
    result = subprocess.run([sys.executable, str(TOOL), *common, "--gpu-memory", "100KB"], capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert result.returncode == 1 and "no layout of 4 GPUs fits 100KB per GPU" in result.stderr, result.stderr


def test_cli_refuses_a_reward_model_as_policy(tiny_configs):
    with pytest.raises(SystemExit, match="is a reward model; the policy must be a causal LM"):
        _tool().run(["--policy", str(tiny_configs["reward"]), "--reward", str(tiny_configs["reward"])])


@pytest.mark.parametrize("path", sorted(SCALING.glob("*.yaml")), ids=lambda path: path.name)
def test_scaling_yaml_headers_are_the_planners_current_output(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name the configs relative to the repository root
    tool = _tool()
    text = path.read_text()
    argv = tool.parse_comment_command(text)
    assert argv is not None, f"{path.name} has no '# python tools/plan_memory.py' comment"
    status, block = tool.run([*argv, "--comment"])
    assert status == 0, block
    assert "\n".join(block) in text, f"{path.name}: regenerate its header with\n" + "\n".join(block)
