"""Rollout backend on Megatron-Core's static inference engine: samples with the Megatron policy itself, sharded
by TP / PP like training, so no second copy of the weights exists and no weight sync is needed."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Iterable

import torch

from megatron_save.rollout.engine import Rollouts, SamplingSettings


class _TokenizerAdapter:
    """The tokenizer interface Megatron's text-generation controller calls."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eod = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Any, **_: Any) -> str:
        return self.tokenizer.decode(list(ids))

    def offsets(self, ids: Any, text: str) -> list[int]:
        return []


def check_megatron_sampling(sampling: SamplingSettings, behaviour_logprobs: bool = False) -> None:
    """Refuses sampling settings the static engine cannot honour, naming them (with ``behaviour_logprobs``, also
    those whose behaviour log-probs it does not report)."""
    if behaviour_logprobs and sampling.top_p < 1.0:
        raise ValueError("policy.rollout_correction needs the rollout engine's behaviour log-probs: "
                         "rollout.backend=megatron reports them with temperature and top_k, not top_p "
                         f"(rollout.sampling.top_p={sampling.top_p}); set top_p=1.0 or use "
                         "rollout.backend=transformers or vllm")
    if sampling.top_k > 0 and sampling.top_p < 1.0:
        raise ValueError(f"rollout.backend=megatron: Megatron-Core samples with top_k or top_p, not both "
                         f"(rollout.sampling.top_k={sampling.top_k}, top_p={sampling.top_p}); set top_k=0 or "
                         "top_p=1.0, or use rollout.backend=transformers")
    if sampling.stop_token_ids:
        raise ValueError("rollout.backend=megatron stops only at the tokenizer's EOS token; "
                         f"rollout.sampling.stop_token_ids={sampling.stop_token_ids} is not supported")


def _wrap_for_inference(policy: Any, context: Any, max_sequence_length: int, max_batch_size: int) -> Any:
    """Megatron's GPT inference wrapper around ``policy``. megatron-core 0.16 takes an InferenceWrapperConfig
    (hidden size, dtype, padded vocabulary, limits); 0.17 removed that class and reads all of it from the model
    and the inference context: which one the installed version has is detected by importing the class."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    try:
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
    except ImportError:
        return GPTInferenceWrapper(policy, context)
    config = policy.config
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1, padded_vocab_size=policy.vocab_size,
        inference_max_requests=max_batch_size, inference_max_seq_length=max_sequence_length)
    return GPTInferenceWrapper(policy, wrapper_config, context)


def _inference_mode() -> Any:
    """megatron-core's process-wide inference flag (``InferenceMode``, 0.18+), or None where it has none.

    While the flag is set, every GPT forward takes the inference path (and asserts when its caller does not gather
    the tensor-parallel logits, as training and scoring forwards do not); 0.18's StaticInferenceEngine sets it when
    built and never clears it."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return None
    return InferenceMode


@contextlib.contextmanager
def inference_mode_only_inside() -> Iterator[None]:
    """Sets megatron-core's inference flag (where it has one) for the block and restores its previous state after,
    also when the block sets it itself (the engine's constructor does): generation is the only inference here."""
    mode = _inference_mode()
    if mode is None:
        yield
        return
    was_active = mode.is_active()
    mode.set_active()
    try:
        yield
    finally:
        if not was_active:
            mode.unset_active()


def behaviour_logprobs(last_token_logits: torch.Tensor, sampled: torch.Tensor, temperature: float,
                       top_k: int) -> torch.Tensor:
    """Log-probs of the sampled tokens under the distribution they were drawn from: the logits divided by the
    temperature, cut to the ``top_k`` largest where set (as Megatron's sampler cuts them).

    last_token_logits: [B, V]; sampled: [B] token ids; returns [B] float32."""
    scaled = last_token_logits.float() / temperature  # [B, V]
    if top_k > 0:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.log_softmax(scaled, dim=-1).gather(-1, sampled.long()[:, None])[:, 0]


def _recording_controller(base: type) -> type:
    """Megatron's text-generation controller, also recording each sampled token's behaviour log-prob.

    megatron-core's own ``return_log_probs`` gives log-softmax of the raw logits (temperature 1, no top-k) and
    leaves out the EOS a response stopped at; the log-probs rollout correction needs are those of the
    distribution each token was sampled from, EOS included. ``sample_from_logits`` (one call per decoding step
    of the static batch, the same arguments from 0.16 to 0.19) sees the logits and returns the sampled tokens;
    ``generate_all_output_tokens_static_batch`` runs one batch, whose rows are its requests in order."""

    class RecordingController(base):
        recording: bool = False

        def sample_from_logits(self, last_token_logits, sampling_params=None, vocab_size=None,
                               generation_started=None, *args, **kwargs):
            sampled = super().sample_from_logits(last_token_logits, sampling_params, vocab_size,
                                                 generation_started, *args, **kwargs)
            if self.recording:
                # Greedy decoding draws from a point mass; its tokens get the policy's own temperature-1
                # log-probs, which is what the trainer takes as pi_old for a greedy run.
                greedy = sampling_params.top_k == 1
                logprobs = behaviour_logprobs(last_token_logits, sampled, 1.0 if greedy else
                                              sampling_params.temperature, 0 if greedy else sampling_params.top_k)
                self.steps.append((logprobs.cpu(), generation_started.cpu()))  # [B], [B] bool
            return sampled

        def generate_all_output_tokens_static_batch(self, active_requests, *args, **kwargs):
            self.steps = []
            done = super().generate_all_output_tokens_static_batch(active_requests, *args, **kwargs)
            if self.recording:
                logprobs = torch.stack([lp for lp, _ in self.steps])  # [steps, B]
                started = torch.stack([s for _, s in self.steps])  # [steps, B]
                for row, request in enumerate(active_requests.values()):
                    # A row samples its k-th token at the k-th step where it has started generating.
                    self.behaviour[request.request_id] = logprobs[started[:, row], row].tolist()
            self.steps = []
            return done

    return RecordingController


class MegatronRolloutEngine:
    """Collective engine: every rank of a model-parallel group calls ``generate`` with the same prompts.

    ``policy`` is this rank's stage of the Megatron policy (unwrapped); sampling reads its current parameters,
    so ``update_weights`` has nothing to do. With ``return_logprobs``, each sampled token's behaviour log-prob
    (temperature and top-k applied, as sampled) comes back from the sampling forward itself.
    """

    collective = True
    shares_policy_weights = True

    def __init__(self, policy: Any, tokenizer: Any, max_sequence_length: int, max_batch_size: int,
                 return_logprobs: bool = False):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        context = StaticInferenceContext(max_batch_size, max_sequence_length)
        self.tokenizer = tokenizer
        self.return_logprobs = return_logprobs
        self.controller = _recording_controller(TextGenerationController)(
            _wrap_for_inference(policy, context, max_sequence_length, max_batch_size), _TokenizerAdapter(tokenizer))
        self.controller.recording = return_logprobs
        self.controller.behaviour = {}
        with warnings.catch_warnings(), inference_mode_only_inside():
            warnings.simplefilter("ignore")  # the legacy static engine announces its deprecation on every build
            self.engine = StaticInferenceEngine(self.controller, max_batch_size=max_batch_size, legacy=True)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> Rollouts:
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams

        check_megatron_sampling(sampling, self.return_logprobs)
        longest = max(len(p) for p in prompt_ids) + sampling.max_new_tokens
        if longest > self.max_sequence_length:
            raise ValueError(f"a prompt of {longest - sampling.max_new_tokens} tokens + max_new_tokens="
                             f"{sampling.max_new_tokens} exceeds the engine's {self.max_sequence_length} tokens")
        greedy = sampling.temperature == 0
        params = SamplingParams(
            temperature=1.0 if greedy else sampling.temperature, top_k=1 if greedy else sampling.top_k,
            top_p=0.0 if greedy or sampling.top_p >= 1.0 else sampling.top_p,
            num_tokens_to_generate=sampling.max_new_tokens, termination_id=self.tokenizer.eos_token_id)
        if sampling.seed is not None:
            self.engine.random_seed = sampling.seed
            self.controller.sampling_rng.manual_seed(sampling.seed)
        rows = [prompt for prompt in prompt_ids for _ in range(sampling.n)]
        requests = [InferenceRequest(request_id=str(i), prompt="", sampling_params=params, prompt_tokens=list(p))
                    for i, p in enumerate(rows)]
        # The engine reseeds torch's global generator on every call: keep that inside a fork.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        self.controller.behaviour = {}
        with torch.random.fork_rng(devices=devices), inference_mode_only_inside():
            done = self.engine.generate(inference_requests=requests)
        responses, truncated, logprobs = [], [], []
        for request in done:
            tokens = request.generated_tokens.tolist()[: request.generated_length]
            # The engine leaves the EOS it stopped at out of the generated tokens: put it back, as other backends
            # return a stopped response up to and including its stop token.
            stopped = request.generated_length < sampling.max_new_tokens
            response = tokens + [self.tokenizer.eos_token_id] if stopped else tokens
            responses.append(response)
            truncated.append(not stopped)
            if self.return_logprobs:
                logprobs.append(self.controller.behaviour[request.request_id][: len(response)])
        self.controller.behaviour = {}
        return Rollouts.from_rows(prompt_ids, sampling.n, responses, truncated,
                                  logprobs if self.return_logprobs else None)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to load: the engine samples from the training model's own parameters."""
        for _ in named_tensors:
            pass
