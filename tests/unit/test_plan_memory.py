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
header against the planner's current output for the command written in it, that command against the YAML's own
settings, and its peak against 72 GiB.

The per-phase plan: each phase holds what trainers/offload.py leaves resident plus what the phase brings back
(hand-checked below); recompute's saved bytes against Megatron-Core's with recompute set in the TransformerConfig
(full / uniform and block, selective; byte-exact here, the issue asks 5%); token budgets; the layout search; the
launch check's refusal (device memory injected) and that every stage runs it before it builds a model. The plan
against what each phase really holds at two layouts: tools/validate_memory_plan.py (run at a tiny size here; its
SmolLM2-135M run is docs/perf/memory_plan_validation.txt).
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
    GIB,
    KNOBS,
    Recompute,
    buffer_numel,
    candidate_layouts,
    micro_batch_sequences,
    plan_training,
    search_fits,
    setting_variants,
    settings_cost,
    stage_activation_bytes,
    stage_activations,
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
    ("Qwen3-30B-A3B", 30.5), ("Qwen3-235B-A22B", 235.1), ("Qwen3-4B", 4.02),
    ("Skywork-Reward-V2-Llama-3.2-3B", 3.21)])
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
    assert set(out) == {"per_gpu_bytes", "phases", "peak", "layout"}
    assert [phase["name"] for phase in out["phases"]] == ["rollout", "logprobs", "rm_scoring", "rm_update",
                                                          "policy_update"]
    assert all(phase["total"] == sum(phase["parts"].values()) for phase in out["phases"])
    assert out["peak"]["bytes"] == max(phase["total"] for phase in out["phases"])
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


@pytest.mark.parametrize("path", sorted(SCALING.glob("stage3_*.yaml")), ids=lambda path: path.name)
def test_scaling_yaml_headers_are_the_planners_current_output(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name the configs relative to the repository root
    tool = _tool()
    text = path.read_text()
    argv = tool.parse_comment_command(text)
    assert argv is not None, f"{path.name} has no '# python tools/plan_memory.py' comment"
    status, block = tool.run([*argv, "--comment"])
    assert status == 0, block
    assert "\n".join(block) in text, f"{path.name}: regenerate its header with\n" + "\n".join(block)
    # The per-phase table, and a peak that leaves 8 GiB of an 80 GB GPU free.
    assert any("policy_update" in line and "rm_update" in line for line in block)
    args = tool.build_parser().parse_args(argv)
    policy, reward = tool.load_architecture(args.policy, False), tool.load_architecture(args.reward, True)
    plan = plan_memory(policy, reward, tool.layout_of(args))
    assert plan.peak <= 72 * GIB, f"{path.name}: peak {plan.peak / GIB:.2f} GiB ({plan.peak_phase.name})"
    # The command plans what the overlay runs: the layout the launch check reads from the config files.
    assert _overlay_layout(path, args) == tool.layout_of(args), path.name


def _overlay_layout(path: Path, args) -> MemoryLayout:
    """The launch check's MemoryLayout of examples/paper/stage3_save.yaml + the overlay ``path``, on the
    command's TP x PP x DP GPUs. Merged without the schema's key check, so that the recompute and token-budget
    keys load before their dataclass fields exist (the adapter reads them by name)."""
    from omegaconf import OmegaConf

    from megatron_save.trainers.memory_check import stage3_layout
    from megatron_save.trainers.stage3 import Stage3Config

    schema = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(Stage3Config)))  # defaults, no key check
    cfg = OmegaConf.merge(schema, OmegaConf.load(REPO / "examples" / "paper" / "stage3_save.yaml"),
                          OmegaConf.load(path))
    world = args.tp * args.pp * args.dp
    return stage3_layout(cfg, world, args.dtype, args.value_head, args.spec, fused_activation=True)


# -- the phases of a step ---------------------------------------------------------------------------------------

def _tiny_pair():
    return (architecture_from_hf(tiny_hf_config("llama"), False),
            architecture_from_hf(tiny_hf_config("qwen3", reward_model=True), True))


def _phase(plan, name):
    return next(phase for phase in plan.phases if phase.name == name)


def test_each_phase_holds_what_offload_leaves_and_what_it_brings_back():
    policy, reward = _tiny_pair()
    base = MemoryLayout(micro_batch=2, reward_micro_batch=4, distributed_optimizer=True, value_head=True,
                        prompt_length=PROMPT, response_length=RESPONSE)
    shape = dict(tp=1, pp=1, stage=0)
    p = trained_bytes(stage_params(policy, **shape), base)
    r = trained_bytes(stage_params(reward, **shape, value_head=True), base)
    reference = stage_params(policy, **shape).total() * 2
    kept = plan_memory(policy, reward, base)
    assert [phase.name for phase in kept.phases] == ["rollout", "logprobs", "rm_scoring", "rm_update", "policy_update"]
    assert kept.peak == max(phase.total for phase in kept.phases) <= kept.total
    # Nothing offloaded: every phase holds both models' states and the reference.
    for phase in kept.phases:
        assert (phase.parts["policy_gradients"], phase.parts["reward_optimizer_states"]) == (p.gradients, r.optimizer)
        assert phase.parts["reference_weights"] == reference
    # The transformers engine keeps its copy; its KV cache lives during the rollout only.
    assert all(phase.parts["rollout_weights"] > 0 for phase in kept.phases)
    assert [phase.parts["rollout_kv_cache"] > 0 for phase in kept.phases] == [True, False, False, False, False]
    assert _phase(kept, "rm_update").parts["reward_activations"] == stage_activation_bytes(reward, base, 0, 4)
    off = plan_memory(policy, reward, replace(base, offload_gradients=True, offload_optimizer=True,
                                               offload_reference=True))
    for phase in off.phases:
        own = {"rm_update": "reward", "policy_update": "policy"}.get(phase.name)
        for name, state in (("policy", p), ("reward", r)):
            assert phase.parts[f"{name}_gradients"] == (state.gradients if name == own else 0), phase
            assert phase.parts[f"{name}_optimizer_states"] == (state.optimizer if name == own else 0), phase
        assert phase.parts["reference_weights"] == (reference if phase.name == "logprobs" else 0)
        assert phase.total < _phase(kept, phase.name).total
    # vLLM sleeps between rollouts (nothing held outside the rollout) unless told to stay awake.
    vllm = replace(base, rollout_backend="vllm")
    asleep, awake = plan_memory(policy, reward, vllm), plan_memory(policy, reward, replace(vllm, vllm_sleep=False))
    assert [phase.parts["rollout_weights"] > 0 for phase in asleep.phases] == [True, False, False, False, False]
    assert all(phase.parts["rollout_weights"] > 0 and phase.parts["rollout_kv_cache"] > 0 for phase in awake.phases)
    # A frozen RM (GRPO) has no update phase.
    assert "rm_update" not in [phase.name for phase in plan_memory(policy, reward, replace(
        base, reward_trained=False)).phases]


def test_the_all_resident_total_is_the_previous_planners():
    """The 8B example's old command: 205.67 GiB, the number issue 43 quotes from the headers before this change."""
    tool = _tool()
    configs = SCALING / "configs"
    argv = ["--policy", str(configs / "Llama-3.1-8B-Instruct"), "--reward",
            str(configs / "Skywork-Reward-V2-Llama-3.1-8B"), "--tp", "2", "--dp", "4", "--distributed-optimizer",
            "--value-head", "--micro-batch", "2", "--reward-micro-batch", "16"]
    args = tool.build_parser().parse_args(argv)
    plan = plan_memory(tool.load_architecture(args.policy, False), tool.load_architecture(args.reward, True),
                       tool.layout_of(args))
    assert round(plan.total / GIB, 2) == 205.67
    assert round(plan.per_gpu_bytes["reward_activations"] / GIB, 2) == 89.88
    assert plan.peak_phase.name == "rm_update" and plan.peak < plan.total


def test_stage2_plans_the_backbone_as_trained_at_pp_above_one():
    """Stage 2 trains only the value head: at PP = 1 the backbone is frozen (no gradients, optimizer states or saved
    activations but the head's); at PP > 1 build_train_state keeps it trainable at a learning rate of zero, so the
    plan is the trained model's."""
    _, reward = _tiny_pair()
    layout = MemoryLayout(prompt_length=PROMPT, response_length=RESPONSE, value_head=True, micro_batch=4)
    head = reward.hidden * 2 * 4  # the value head's fp32 weights and bias
    frozen = plan_training(reward, layout, backbone_trained=False).per_gpu_bytes
    assert frozen["reward_gradients"] == head and frozen["reward_optimizer_states"] == 3 * head
    assert "reward_activations" not in frozen and frozen["reward_forward"] > 0
    for stages in (2, 4):
        piped = replace(layout, pp=stages)
        assert plan_training(reward, piped, backbone_trained=False).per_gpu_bytes == plan_training(
            reward, piped, backbone_trained=True).per_gpu_bytes
        assert plan_training(reward, piped, backbone_trained=False).per_gpu_bytes["reward_activations"] > 0


def test_token_budget_bounds_a_micro_batch_by_its_tokens():
    policy, _ = _tiny_pair()
    layout = MemoryLayout(prompt_length=PROMPT, response_length=RESPONSE)
    assert micro_batch_sequences(layout, 8, 0) == 8
    assert micro_batch_sequences(layout, 8, 3 * 32) == 3  # 96 tokens: three 32-token sequences
    assert stage_activation_bytes(policy, replace(layout, max_tokens_per_micro_batch=64), 0,
                                  micro_batch_sequences(layout, 8, 64)) == stage_activation_bytes(policy, layout, 0, 2)
    with pytest.raises(ValueError, match="token budget of 31 per micro-batch is below one full-length sequence of 32"):
        micro_batch_sequences(layout, 8, 31)
    # Stage 1 keeps a pair together: its smallest budget, and the smallest the search suggests, is two sequences.
    pairs = replace(layout, rows_per_example=2)
    with pytest.raises(ValueError, match="below 2 full-length sequences of 32 tokens"):
        micro_batch_sequences(pairs, 8, 32)
    assert micro_batch_sequences(pairs, 8, 64) == 2
    assert {v.max_tokens_per_micro_batch for v in setting_variants(replace(pairs, micro_batch=8),
                                                                   ("max_tokens_per_micro_batch",))} == {0, 64, 128}
    reward = architecture_from_hf(tiny_hf_config("qwen3", reward_model=True), True)
    fixed = plan_memory(policy, reward, replace(layout, reward_micro_batch=16))
    budget = plan_memory(policy, reward, replace(layout, reward_micro_batch=16, reward_max_tokens_per_micro_batch=64))
    assert _phase(budget, "rm_update").parts["reward_activations"] < _phase(fixed, "rm_update").parts[
        "reward_activations"]


@pytest.mark.parametrize("recompute", [Recompute("full"), Recompute("full", "uniform", 2), Recompute("full", "block", 1),
                                       Recompute("selective")], ids=str)
@pytest.mark.parametrize("family, dtype", [("llama", "bf16"), ("qwen3", "fp32")])
def test_recompute_saved_bytes_equal_megatron(family, dtype, recompute, world_of_one):
    """A model built with the package's recompute settings (Megatron-Core's TransformerConfig recompute_*): the
    bytes its forward saves for backward (measured as above) are the planner's ``saved`` (5% asked; the account
    is byte-exact)."""
    from megatron_save.config import RecomputeSettings
    from megatron_save.models.builder import build_model
    from megatron_save.models.policy import token_logprobs

    config = tiny_hf_config(family)
    torch.manual_seed(0)
    settings = RecomputeSettings(recompute.granularity, recompute.method, recompute.num_layers)
    model = build_model(config, "causal_lm", dtype=dtype, spec_backend="local", recompute=settings)
    assert model.decoder.config.recompute_granularity == recompute.granularity
    model.train()
    tokens = torch.randint(0, config.vocab_size, (BATCH, PROMPT + RESPONSE))
    measured, _ = _saved_activation_bytes(
        model, tokens, lambda logits: -token_logprobs(logits[:, :-1], tokens[:, 1:]).sum())
    arch = architecture_from_hf(config, reward_model=False)
    layout = MemoryLayout(dtype=dtype, spec="local", fused_activation=False, prompt_length=PROMPT,
                          response_length=RESPONSE)
    planned = stage_activations(arch, layout, 0, BATCH, recompute)
    assert abs(planned.saved - measured) <= 0.05 * measured, (planned, measured)
    assert planned.saved < stage_activation_bytes(arch, layout, 0, BATCH)  # recompute keeps less
    assert planned.rematerialised > 0


# -- the layout search ------------------------------------------------------------------------------------------

def test_search_lists_cheapest_fits_first():
    policy, reward = _tiny_pair()
    base = MemoryLayout(micro_batch=4, reward_micro_batch=8, distributed_optimizer=True, value_head=True,
                        prompt_length=PROMPT, response_length=RESPONSE)
    plan_of = lambda layout: plan_memory(policy, reward, layout)  # noqa: E731
    layouts = candidate_layouts(policy, reward, 4, base)
    budget = int(plan_of(base).peak * 0.6)  # the base settings do not fit at TP=1, other settings do
    fits = search_fits(plan_of, layouts, budget, KNOBS)
    assert fits and all(fit.peak <= budget for fit in fits)
    assert [settings_cost(f.layout) for f in fits] == sorted(settings_cost(f.layout) for f in fits)
    assert any(fit.layout.tp == 1 and fit.layout.pp == 1 for fit in fits)
    assert search_fits(plan_of, layouts, 1000, KNOBS) == []
    # Full recompute costs more than any offload or model-parallel change; token budgets cost least.
    assert settings_cost(replace(base, policy_recompute=Recompute("full"))) > settings_cost(
        replace(base, tp=4, offload_optimizer=True, offload_gradients=True, offload_reference=True))
    assert settings_cost(replace(base, max_tokens_per_micro_batch=64)) < settings_cost(
        replace(base, reward_recompute=Recompute("selective")))


def test_cli_finds_layouts_that_fit_8b_on_8_gpus():
    configs = SCALING / "configs"
    status, lines = _tool().run([
        "--policy", str(configs / "Llama-3.1-8B-Instruct"), "--reward", str(configs / "Skywork-Reward-V2-Llama-3.1-8B"),
        "--tp", "2", "--dp", "4", "--distributed-optimizer", "--value-head", "--micro-batch", "2",
        "--reward-micro-batch", "16", "--gpus", "8", "--gpu-memory", "80GiB", "--margin-gib", "8"])
    assert status == 0, lines
    rows = [line.split() for line in lines[2:]]
    assert rows and all(float(row[4]) <= 72 for row in rows)
    assert rows[0][:4] == ["2", "1", "1", "4"] and "offload.gradients=true" in lines[2], lines
    status, lines = _tool().run([
        "--policy", str(configs / "Llama-3.1-8B-Instruct"), "--reward", str(configs / "Skywork-Reward-V2-Llama-3.1-8B"),
        "--tp", "2", "--dp", "4", "--micro-batch", "2", "--reward-micro-batch", "16", "--gpus", "8",
        "--gpu-memory", "80GiB", "--margin-gib", "8", "--fixed-settings"])
    assert status == 1 and "no layout of 8 GPUs fits 80GiB per GPU less a 8 GiB margin" in lines[0], lines


# -- the launch check -------------------------------------------------------------------------------------------

def _capture(name: str):
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    return records, handler


def test_launch_check_refuses_naming_the_phase_and_settings_that_fit():
    from megatron_save.planning.memory import STAGE3_SETTINGS
    from megatron_save.trainers.memory_check import MemoryPlanError, check_plan

    policy, reward = _tiny_pair()
    base = MemoryLayout(micro_batch=4, reward_micro_batch=8, distributed_optimizer=True, value_head=True,
                        prompt_length=PROMPT, response_length=RESPONSE)
    plan_of = lambda layout: plan_memory(policy, reward, layout)  # noqa: E731
    plan = plan_of(base)
    margin_gib = 2**-10
    device = int(plan.peak * 0.7) + int(margin_gib * GIB)  # the peak exceeds the device less its margin
    check = lambda device, enabled=True: check_plan(  # noqa: E731
        plan, plan_of, KNOBS, STAGE3_SETTINGS, device, margin_gib, enabled, [base], "stage 3")
    with pytest.raises(MemoryPlanError) as refusal:
        check(device)
    message = str(refusal.value)
    phase = plan.peak_phase
    assert f"the {phase.name} phase needs {phase.total / GIB:.2f} GiB per GPU" in message
    assert all(name in message for name, value in phase.parts.items() if value)
    assert "Cheapest settings that fit" in message and "memory_check.enabled=false" in message
    fits = search_fits(plan_of, [base], device - int(margin_gib * GIB), KNOBS)
    first = [line for line in message.splitlines() if line.startswith("  ")][0]
    assert first.endswith(f"-> peak {fits[0].peak / GIB:.2f} GiB ({fits[0].peak_phase.name})"), message
    assert any(setting in first for setting in ("max_tokens_per_micro_batch=", "offload.", "recompute."))
    check(plan.peak + int(margin_gib * GIB))  # fits exactly: no refusal
    records, handler = _capture("megatron_save.trainers.memory_check")
    try:
        check(device, enabled=False)  # memory_check.enabled=false: a warning, no refusal
        check(None)  # CPU: the plan is logged, nothing checked
    finally:
        import logging

        logging.getLogger("megatron_save.trainers.memory_check").removeHandler(handler)
    assert any("starting anyway (memory_check.enabled=false)" in record for record in records)
    assert any("policy_update" in record and "all-resident" in record for record in records)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft", "stage3"])
def test_every_stage_checks_its_plan_before_it_builds_a_model(stage, tiny_models, rl_data, tmp_path, monkeypatch):
    """Each stage's entry plans its memory from its checkpoints and refuses before any model exists (a device of
    a few MiB injected through memory_check.device_memory; on CPU it is None and the plan is only logged)."""
    from megatron_save.trainers import memory_check
    from megatron_save.trainers.common import DataSettings
    from megatron_save.trainers.memory_check import MemoryPlanError

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the memory check")

    monkeypatch.setattr(memory_check, "device_memory", lambda: 6 * GIB + 2**20)  # 1 MiB above the 6 GiB margin
    if stage == "stage3":
        from megatron_save.trainers.stage3 import Stage3Config, loop
        from megatron_save.trainers.stage3.config import PolicySettings, RewardSettings

        monkeypatch.setattr(loop, "build_stage3_run", built)
        cfg = Stage3Config(output_dir=str(tmp_path / "out"), train_data=str(rl_data["prompts"]),
                           policy=PolicySettings(checkpoint=str(tiny_models["llama-lm"]["mg"])),
                           reward=RewardSettings(checkpoint=str(tiny_models["llama-rmv"]["mg"])))
        entry = loop.train_stage3
    else:
        module = {"stage1": "megatron_save.trainers.stage1_bt", "stage2": "megatron_save.trainers.stage2_value",
                  "sft": "megatron_save.trainers.sft"}[stage]
        import importlib

        trainer = importlib.import_module(module)
        monkeypatch.setattr(trainer, "start_from_checkpoint", built)
        config_class = {"stage1": "Stage1Config", "stage2": "Stage2Config", "sft": "SFTConfig"}[stage]
        checkpoint = tiny_models["llama-lm" if stage == "sft" else "llama-rm"]["mg"]
        cfg = getattr(trainer, config_class)(checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"),
                                             data=DataSettings(train_data=str(rl_data["pairs"])))
        entry = {"stage1": "train_stage1", "stage2": "train_stage2", "sft": "train_sft"}[stage]
        entry = getattr(trainer, entry)
    with pytest.raises(MemoryPlanError, match=r"phase needs .* GiB per GPU"):
        entry(cfg)
    cfg.memory_check.enabled = False  # the override: the check passes and the (stubbed) build is reached
    with pytest.raises(AssertionError, match="a model was built before the memory check"):
        entry(cfg)
    cfg.memory_check.enabled = True
    monkeypatch.setattr(memory_check, "device_memory", lambda: None)  # CPU: the plan is logged, not checked
    records, handler = _capture("megatron_save.trainers.memory_check")
    try:
        with pytest.raises(AssertionError, match="a model was built before the memory check"):
            entry(cfg)
    finally:
        import logging

        logging.getLogger("megatron_save.trainers.memory_check").removeHandler(handler)
    assert any("planned memory per GPU" in record and "peak:" in record for record in records), records


def test_stage3_check_names_what_r2m_adds_beyond_the_plan(tiny_models, rl_data, tmp_path):
    """R2M's feedback states (every response's fp32 policy hidden states, on every rank) are outside the phase plan:
    the stage-3 check says so with their size, for R2M only."""
    import logging

    from megatron_save.trainers.memory_check import check_stage3_memory
    from megatron_save.trainers.stage3 import Stage3Config
    from megatron_save.trainers.stage3.config import PolicySettings, RewardSettings

    logged = {}
    for strategy in ("r2m", "save"):
        cfg = Stage3Config(output_dir=str(tmp_path / "out"), train_data=str(rl_data["prompts"]),
                           policy=PolicySettings(checkpoint=str(tiny_models["llama-lm"]["mg"])),
                           reward=RewardSettings(checkpoint=str(tiny_models["llama-rmv"]["mg"]), strategy=strategy),
                           prompts_per_step=512, max_prompt_length=4096)  # GiBs of feedback even at hidden 64
        cfg.rollout.sampling.n = 16
        records, handler = _capture("megatron_save.trainers.memory_check")
        try:
            check_stage3_memory(cfg, device_bytes=None)
        finally:
            logging.getLogger("megatron_save.trainers.memory_check").removeHandler(handler)
        logged[strategy] = [r for r in records if "R2M's feedback" in r]
    responses = cfg.prompts_per_step * cfg.rollout.sampling.n
    tokens = cfg.max_prompt_length + cfg.rollout.sampling.max_new_tokens
    hidden = json.loads((tiny_models["llama-lm"]["hf"] / "config.json").read_text())["hidden_size"]
    assert logged["save"] == [] and len(logged["r2m"]) == 1 and responses * tokens * hidden * 4 > GIB
    assert f"{responses} responses x {tokens} tokens: at least {responses * tokens * hidden * 4 / GIB:.2f} GiB" in \
        logged["r2m"][0]


def test_validation_tool_agrees_within_ten_percent(tmp_path):
    """tools/validate_memory_plan.py at its tiny size: every phase of both layouts within 10% (the committed
    artifact is its SmolLM2-135M run)."""
    from helpers import torchrun_tool

    out = tmp_path / "validation.txt"
    torchrun_tool("validate_memory_plan.py", 1, "--size", "tiny", "--dtype", "bf16", "--out", str(out), timeout=900)
    torchrun_tool("validate_memory_plan.py", 2, "--size", "tiny", "--dtype", "bf16", "--out", str(out), "--append",
                  timeout=900)
    text = out.read_text()
    assert text.count(" stage ") == 15, text  # TP1 PP1: 1 rank, TP1 PP2: 2 ranks; 5 phases each
    assert "over 2 layout(s)" in text and "PASS" in text.splitlines()[-1], text
    committed = (REPO / "docs" / "perf" / "memory_plan_validation.txt").read_text()
    assert committed.count("--size 135m") == 2 and "over 2 layout(s)" in committed
    assert committed.splitlines()[-1].endswith("PASS")


def test_scaling_guide_quotes_committed_artifacts():
    """docs/guides/scaling.md's 8B table is the overlay's header, each peak it quotes is its overlay's, and the
    numbers of the 8B run without fitting settings are docs/perf/plan_memory_8b.txt's."""
    import re

    guide = (REPO / "docs" / "guides" / "scaling.md").read_text()
    header = (SCALING / "stage3_8b.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(header) if line.startswith("# per GPU, GiB"))
    end = next(i for i, line in enumerate(header) if line.startswith("# peak:"))
    assert "\n".join(line[2:] for line in header[start:end + 1]) in guide
    quoted = re.findall(r"`(stage3_\w+\.yaml)`[^`]*? (\d+\.\d+)\s+GiB", guide)
    assert len(quoted) == 4, quoted
    for name, peak in quoted:
        assert re.search(rf"^# peak: \w+, {re.escape(peak)} GiB", (SCALING / name).read_text(), re.M), name
    record = (REPO / "docs" / "perf" / "plan_memory_8b.txt").read_text()
    assert "peak: rm_update, 177.43 GiB" in record and "reward_activations" in record and " 89.88 " in record
    assert "177.43 GiB" in guide and "89.88 GiB" in guide
