"""Rollout backend on vLLM's offline engine, colocated with training on every rank (GPU; optional dependency).

Every rank builds one ``vllm.LLM`` with the ``external_launcher`` executor, which joins the torchrun world that
Megatron already started: vLLM cuts that world into tensor-parallel groups of ``tensor_parallel_size``
consecutive ranks, each an independent engine ("external data parallel"). Megatron's rank order puts a
tensor-parallel group on consecutive ranks, so when the vLLM size divides the policy's tensor-parallel size
every rank of a vLLM engine serves the same data-parallel share of the prompts, as Megatron's groups are
called collectively (``collective = True``).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): new weights reach vLLM's model object
through ``LLM.apply_model`` and its ``load_weights`` (HF names, full tensors; vLLM shards them itself), without a
copy through another process. Between rollouts the engine sleeps (level 1: weights to host memory, KV cache
freed), so the training phases have the GPU.

Written against vLLM 0.25-0.33 (``logprobs_mode``, ``apply_model``, ``sleep`` / ``wake_up``,
``reset_prefix_cache``); vLLM is not installed where this project's tests run, so the tests exercise this
adapter against a stand-in of that API.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from megatron_save.rollout.engine import Rollouts, SamplingSettings, check_weight_stream

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class VLLMSettings:
    """vLLM's offline engine on every rank (rollout.backend=vllm)."""

    tensor_parallel_size: int = 1
    """GPUs per vLLM engine (consecutive ranks); must divide the policy's tensor-parallel size."""
    gpu_memory_utilization: float = 0.3
    """Fraction of each GPU vLLM takes for its weights and KV cache while awake; training keeps the rest."""
    sleep_between_rollouts: bool = True
    """After each rollout, sleep at level 1 (weights to host memory, KV cache freed) until the next one."""
    enforce_eager: bool = False
    """Decode without CUDA graphs (less memory and start-up time, slower decoding)."""


def check_vllm_settings(settings: VLLMSettings, sampling: SamplingSettings, policy_tensor_parallel: int) -> None:
    """Refuses, naming the setting, what vLLM would reject at the first rollout or later: no CUDA, no torchrun
    (the external launcher reads RANK and LOCAL_RANK), an engine spanning data-parallel shares, sleep mode with
    PyTorch's expandable segments (vLLM's sleep-mode allocator asserts they are off), and sampling values outside
    vLLM's ranges."""
    if not torch.cuda.is_available():
        raise ValueError("rollout.backend=vllm needs CUDA GPUs; on CPU use rollout.backend=megatron or transformers")
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError("rollout.backend=vllm runs under torchrun (vLLM's external launcher reads RANK and "
                         "LOCAL_RANK): launch with torchrun --nproc-per-node N")
    if settings.tensor_parallel_size < 1 or policy_tensor_parallel % settings.tensor_parallel_size:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={settings.tensor_parallel_size} must divide "
                         f"parallel.tensor_model_parallel_size={policy_tensor_parallel}: a vLLM engine's ranks "
                         "must share one data-parallel share of the prompts")
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the second is newer torch's name
        if settings.sleep_between_rollouts and "expandable_segments:True" in os.environ.get(variable, ""):
            raise ValueError(f"rollout.vllm.sleep_between_rollouts=true cannot run with {variable}="
                             f"{os.environ[variable]!r} (vLLM's sleep mode needs expandable segments off): unset "
                             "it, or set rollout.vllm.sleep_between_rollouts=false")
    if not 0.0 <= sampling.temperature <= 2.0:
        raise ValueError(f"rollout.sampling.temperature={sampling.temperature}: vLLM accepts 0 to 2")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"rollout.sampling.top_p={sampling.top_p}: vLLM accepts (0, 1]")


def request_seed(seed: int, row: int) -> int:
    """Sampling seed of request ``row`` under a rank's seed: distinct for every (seed, row) with fewer than 10^6
    rows (the ranks' seeds are consecutive, so ``seed + row`` would give rank d's row r + 1 rank d + 1's row r)."""
    return (seed * 1_000_003 + row) % 2**63


def import_vllm() -> Any:
    """The vllm module, or an error that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError("rollout.backend=vllm needs vLLM on a GPU machine: pip install -e \".[vllm]\" in its own "
                          "environment (vLLM pins its CUDA torch); or use rollout.backend=megatron or transformers"
                          ) from error
    return vllm


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restores Python's, NumPy's and torch's global generators after the body: an in-process vLLM engine reseeds
    them all when it is built, which would change the trainer's random stream."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class VLLMRolloutEngine:
    """Samples with vLLM in this process; ``model_dir`` is an HF model directory or the ``hf/`` side files of a
    megatron-save checkpoint (no weights: vLLM starts from dummy weights that ``update_weights`` replaces)."""

    collective = True
    shares_policy_weights = False

    def __init__(self, model_dir: str | Path, settings: VLLMSettings, dtype: torch.dtype, max_model_len: int,
                 max_batch_size: int, seed: int, return_logprobs: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        # Read when the engine is built: the engine stays in this process, so update_weights reaches its model.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.vllm = import_vllm()
        self.settings = settings
        self.return_logprobs = return_logprobs
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # names and shapes only
            shapes = AutoModelForCausalLM.from_config(config).state_dict()
        self.expected_shapes = {name: tensor.shape for name, tensor in shapes.items()}
        self.tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        self.weights_loaded = any(any(Path(model_dir).glob(pattern)) for pattern in _WEIGHT_PATTERNS)
        with preserved_global_rng():
            self.llm = self.vllm.LLM(
                model=str(model_dir), dtype=dtype, seed=seed, tensor_parallel_size=settings.tensor_parallel_size,
                distributed_executor_backend="external_launcher",
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enable_sleep_mode=settings.sleep_between_rollouts, enforce_eager=settings.enforce_eager,
                max_model_len=max_model_len, max_num_seqs=max_batch_size,
                load_format="auto" if self.weights_loaded else "dummy",
                # Log-probs of the distribution tokens are drawn from (after temperature, top-k, top-p), as the
                # transformers backend returns them.
                logprobs_mode="processed_logprobs",
            )
        self.asleep = False
        self._sleep()

    def _sleep(self) -> None:
        if self.settings.sleep_between_rollouts and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sampling_params(self, sampling: SamplingSettings, row: int) -> Any:
        """vLLM's SamplingParams for response ``row`` of a request (its own seed, from the request's)."""
        stop_ids = sorted({self.tokenizer.eos_token_id, *sampling.stop_token_ids} - {None})
        greedy = sampling.temperature == 0
        return self.vllm.SamplingParams(
            n=1, temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,  # 0: off (vLLM also still takes the older -1)
            max_tokens=sampling.max_new_tokens, stop_token_ids=stop_ids, ignore_eos=False,
            logprobs=0 if self.return_logprobs else None,  # 0: the sampled token's own log-prob only
            seed=None if sampling.seed is None else request_seed(sampling.seed, row), detokenize=False,
        )

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> Rollouts:
        """One request per response (each prompt ``sampling.n`` times in a row: vLLM's prefix cache shares the
        prompt), so greedy decoding and per-response seeds work alike."""
        if not self.weights_loaded:
            raise RuntimeError("the vLLM engine started from dummy weights: call update_weights first")
        self._wake_up()
        rows = [prompt for prompt in prompt_ids for _ in range(sampling.n)]
        params = [self.sampling_params(sampling, row) for row in range(len(rows))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in rows], params, use_tqdm=False)
        self._sleep()
        responses, truncated, logprobs = [], [], []
        for row, output in enumerate(outputs):
            completion = output.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended response {row} with finish_reason={completion.finish_reason!r}")
            ids = list(completion.token_ids)  # includes the stop token, as the protocol asks
            responses.append(ids)
            truncated.append(completion.finish_reason == "length")
            if self.return_logprobs:
                logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        return Rollouts.from_rows(prompt_ids, sampling.n, responses, truncated,
                                  logprobs if self.return_logprobs else None)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checks the whole stream first (a bad one loads nothing), then hands it to vLLM's loaders."""
        incoming = dict(named_tensors)
        check_weight_stream(incoming, self.expected_shapes, optional=self.tied)
        # vLLM's Llama / Qwen loaders skip a tied LM head; it is the embedding, which arrives anyway.
        weights = [(name, tensor) for name, tensor in incoming.items() if name not in self.tied]
        self._wake_up()
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self._sleep()
        self.weights_loaded = True
