"""The vLLM rollout backend's side of the contract, against a stand-in of vLLM's offline API.

vLLM needs CUDA and is not installed where these tests run. The stand-in below implements the few calls the
backend makes, with vLLM's documented behaviour (outputs in request order; ``token_ids`` include the stop token;
``finish_reason`` "stop" / "length"; ``logprobs`` a list of {token id: Logprob}; building an in-process engine
reseeds the global generators). What is tested is this project's code: requests, output conversion, the order
of sleep / wake-up / weight loading, weight checks and refusals. Nothing here shows that vLLM itself runs.
"""

from __future__ import annotations

import random
import shutil
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from megatron_save.checkpoint.model_checkpoint import HF_SUBDIR
from megatron_save.rollout import SamplingSettings, VLLMRolloutEngine, VLLMSettings
from megatron_save.rollout.vllm_engine import check_vllm_settings, preserved_global_rng, request_seed


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


class StandInModel:
    def __init__(self):
        self.loaded: list[str] = []

    def load_weights(self, weights):
        self.loaded += [name for name, _ in weights]
        return set(self.loaded)


class StandInLLM:
    """Each response: ``prompt[-1] + seed``-based tokens, ending in the first stop id after 2 tokens when the
    prompt's last token is odd, else running to max_tokens."""

    def __init__(self, model: str, **kwargs):
        self.model_path, self.kwargs, self.events = model, kwargs, []
        self.model = StandInModel()
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # what an in-process vLLM engine does

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
            if ids[-1] == 99:
                reason = "abort"
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


@pytest.fixture
def stand_in_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = StandInLLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return module


def _engine(model_dir, **kwargs) -> VLLMRolloutEngine:
    return VLLMRolloutEngine(model_dir, VLLMSettings(), torch.bfloat16, max_model_len=64, max_batch_size=8, seed=5,
                             **kwargs)


def _hf_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {name: torch.zeros(t.shape) for name, t in
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).state_dict().items()}


def test_engine_is_built_in_process_from_side_files_without_moving_the_trainers_rng(stand_in_vllm, tiny_models):
    import os

    side_files = tiny_models["llama-lm"]["mg"] / HF_SUBDIR
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    engine = _engine(side_files)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    kwargs = engine.llm.kwargs
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["load_format"] == "dummy"
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"], kwargs["seed"]) == (64, 8, 5)
    assert engine.llm.events == ["sleep1"]
    with pytest.raises(RuntimeError, match="dummy weights: call update_weights first"):
        engine.generate([[1, 2]], SamplingSettings(n=2))
    assert _engine(tiny_models["llama-lm"]["hf"]).llm.kwargs["load_format"] == "auto"


def test_generate_groups_responses_and_reads_vllm_outputs(stand_in_vllm, tiny_models):
    hf_dir = tiny_models["llama-lm"]["hf"]
    engine = _engine(hf_dir, return_logprobs=True)
    eos = AutoTokenizer.from_pretrained(hf_dir).eos_token_id
    sampling = SamplingSettings(n=2, temperature=0.7, top_p=0.8, top_k=0, max_new_tokens=4, stop_token_ids=[3],
                                seed=100)
    rollouts = engine.generate([[5, 7], [6, 8]], sampling)
    assert engine.llm.events == ["sleep1", "wake_up", "generate", "sleep1"]
    assert rollouts.prompt_ids == [[5, 7], [6, 8]]
    stop = min(3, eos)
    # Row r carries seed 100 * 1000003 + r, = 300 + r mod 1000 (10 + last prompt token + that starts each
    # response). Prompt 0 (last token odd) stops after 2 tokens, the stop token kept; prompt 1 runs to
    # max_new_tokens.
    assert rollouts.response_ids == [[[317, 318, stop], [318, 319, stop]],
                                     [[320, 321, 322, 323], [321, 322, 323, 324]]]
    assert rollouts.truncated == [[False, False], [True, True]]
    assert rollouts.logprobs[0][0] == pytest.approx([-0.1, -0.2, -0.3])
    assert len(rollouts.logprobs[1][1]) == 4


def test_sampling_params_follow_the_settings(stand_in_vllm, tiny_models):
    engine = _engine(tiny_models["llama-lm"]["hf"])
    eos = engine.tokenizer.eos_token_id
    params = engine.sampling_params(SamplingSettings(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=9,
                                                     stop_token_ids=[3], seed=10), row=4)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (1, 0.7, 0.8, 20, 9)
    assert params.stop_token_ids == sorted({3, eos}) and params.seed == 10 * 1_000_003 + 4
    assert params.logprobs is None
    greedy = engine.sampling_params(SamplingSettings(temperature=0.0, top_p=0.8, top_k=0), row=0)
    assert (greedy.top_p, greedy.top_k, greedy.seed) == (1.0, 0, None)


def test_an_aborted_response_is_an_error(stand_in_vllm, tiny_models):
    engine = _engine(tiny_models["llama-lm"]["hf"])
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        engine.generate([[5, 99]], SamplingSettings(n=1, max_new_tokens=2))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_update_weights_checks_the_stream_then_loads_it_awake(family, stand_in_vllm, tiny_models):
    side_files = tiny_models[f"{family}-lm"]["mg"] / HF_SUBDIR
    engine = _engine(side_files)
    state = _hf_state(side_files)
    tied = AutoConfig.from_pretrained(side_files).tie_word_embeddings
    assert tied == (family == "qwen2")

    with pytest.raises(KeyError, match="no tensor 'model.extra.weight'"):
        engine.update_weights({**state, "model.extra.weight": torch.zeros(2)}.items())
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"{name} has shape"):
        engine.update_weights({**state, name: torch.zeros(3, 3)}.items())
    with pytest.raises(ValueError, match="no new value"):
        engine.update_weights({k: v for k, v in state.items() if k != name}.items())
    assert engine.llm.events == ["sleep1"] and not engine.weights_loaded  # nothing loaded by a bad stream

    engine.update_weights(state.items())
    assert engine.llm.events == ["sleep1", "wake_up", "apply_model", "reset_prefix_cache", "sleep1"]
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    assert set(engine.llm.model.loaded) == expected and len(engine.llm.model.loaded) == len(expected)
    assert engine.weights_loaded
    engine.generate([[5, 7]], SamplingSettings(n=1, max_new_tokens=3))


def test_request_seeds_never_repeat_across_neighbouring_ranks():
    # Rank d samples with seed base + d; 64 rows per rank.
    seeds = [request_seed(1234 + rank, row) for rank in range(8) for row in range(64)]
    assert len(set(seeds)) == len(seeds)


def test_refusals_name_the_setting(monkeypatch, tiny_models, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    shutil.copytree(tiny_models["llama-lm"]["hf"], tmp_path / "hf")
    with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
        _engine(tmp_path / "hf")
    sampling = SamplingSettings()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="rollout.backend=vllm needs CUDA GPUs"):
            check_vllm_settings(VLLMSettings(), sampling, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="runs under torchrun"):
        check_vllm_settings(VLLMSettings(), sampling, 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"rollout.vllm.tensor_parallel_size=4 must divide .*size=2"):
        check_vllm_settings(VLLMSettings(tensor_parallel_size=4), sampling, 2)
    for field, value in (("temperature", 2.5), ("top_p", 0.0)):
        with pytest.raises(ValueError, match=f"rollout.sampling.{field}={value}"):
            check_vllm_settings(VLLMSettings(), SamplingSettings(**{field: value}), 2)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(ValueError, match="sleep_between_rollouts=true cannot run with PYTORCH_CUDA_ALLOC_CONF"):
        check_vllm_settings(VLLMSettings(), sampling, 2)
    check_vllm_settings(VLLMSettings(sleep_between_rollouts=False), sampling, 2)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    check_vllm_settings(VLLMSettings(tensor_parallel_size=2), sampling, 4)


def test_preserved_global_rng_restores_every_generator():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    with preserved_global_rng():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        random.random(), np.random.rand(), torch.rand(1)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())
