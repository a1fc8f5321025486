"""Rollout backend on transformers ``generate`` (CPU, or one GPU): simple, exact, and slow at scale."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from megatron_save.rollout.engine import Rollouts, SamplingSettings, check_weight_stream, stack_expert_tensors

if TYPE_CHECKING:
    from transformers import GenerationConfig

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def generation_config_for(sampling: SamplingSettings, stop_ids: list[int], pad_id: int, bos_id: int | None,
                          output_scores: bool) -> GenerationConfig:
    """The GenerationConfig of one generate() call, every option that shapes the sampling distribution stated.

    generate() fills an option left unset (None) from the model's generation_config, then from transformers'
    global defaults (top_k=50): sampling states top_k=0 to mean no top-k filtering. Greedy decoding states
    do_sample=False and leaves the sampling options unset: one set beside do_sample=False (top_k=0 included)
    makes transformers 5 warn "generation flags are not valid and may be ignored: ['top_k']". Everything goes in
    the config, not in generate()'s keyword arguments, which transformers 5 deprecates beside a config.
    """
    from transformers import GenerationConfig

    greedy = sampling.temperature == 0
    distribution = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "top_k": sampling.top_k or 0}  # 0 (or None): every token, never transformers' default of 50
    return GenerationConfig(**distribution, max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_ids,
                            pad_token_id=pad_id, bos_token_id=bos_id, num_return_sequences=1,
                            output_scores=output_scores, return_dict_in_generate=True)


class TransformersRolloutEngine:
    """Samples with an HF causal LM held in this process; weights arrive through ``update_weights``.

    ``model_dir`` is an HF model directory, or the ``hf/`` side files of a megatron-save checkpoint (config and
    tokenizer, no weights): the model is then built from its config and must receive ``update_weights`` before
    it generates.
    """

    collective = False
    shares_policy_weights = False

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32,
                 max_batch_size: int | None = None, return_logprobs: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        # Resolved to an index: each process works on its own current GPU (LOCAL_RANK under torchrun).
        self.device = torch.device(device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                              else "cpu"))
        self.max_batch_size = max_batch_size
        self.return_logprobs = return_logprobs
        self.weights_loaded = any(any(Path(model_dir).glob(pattern)) for pattern in _WEIGHT_PATTERNS)
        if self.weights_loaded:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        else:
            with torch.device(self.device):  # initialised in place: the values are overwritten anyway
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eos = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # generate() fills every option its GenerationConfig leaves unset from the model's generation_config, read
        # from the checkpoint's generation_config.json (repetition penalties, top_k=20 and the like): rollouts must
        # come from the policy's own distribution, shaped only by SamplingSettings, so the model keeps token ids
        # alone and each call states its sampling (generation_config_for).
        self.model.generation_config = GenerationConfig(bos_token_id=self.tokenizer.bos_token_id, eos_token_id=eos,
                                                        pad_token_id=self.pad_id)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> Rollouts:
        """Rows of at most ``max_batch_size`` sequences at a time. A seed is applied inside a forked RNG, so the
        process's own generators (shared with Megatron) are left as they were."""
        if not self.weights_loaded:
            raise RuntimeError("the rollout model was built from a config alone: call update_weights first")
        # Each prompt n times in a row (what num_return_sequences does, and greedy decoding allows it too).
        rows = [prompt for prompt in prompt_ids for _ in range(sampling.n)]
        chunk = self.max_batch_size or len(rows)
        # fork_rng restores the CPU generator and the listed GPUs'; manual_seed reseeds every GPU of the process.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            parts = [self._generate_rows(rows[i : i + chunk], sampling) for i in range(0, len(rows), chunk)]
        responses = [r for part in parts for r in part[0]]
        truncated = [t for part in parts for t in part[1]]
        logprobs = [lp for part in parts for lp in part[2]] if self.return_logprobs else None
        return Rollouts.from_rows(prompt_ids, sampling.n, responses, truncated, logprobs)

    def _generate_rows(self, rows: list[list[int]], sampling: SamplingSettings
                       ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(rows):  # left padding: generation continues every prompt at the end
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt):] = 1
        stop_ids = sorted({self.tokenizer.eos_token_id, *sampling.stop_token_ids} - {None})
        config = generation_config_for(sampling, stop_ids, self.pad_id, self.tokenizer.bos_token_id,
                                       self.return_logprobs)
        output = self.model.generate(input_ids=input_ids.to(self.device),
                                     attention_mask=attention_mask.to(self.device), generation_config=config)
        sequences = output.sequences[:, width:].cpu()
        step_logprobs = [None] * len(rows)
        if self.return_logprobs:
            # Log-probs of the sampled tokens under the distribution they were drawn from (after temperature /
            # top-k / top-p): the behaviour policy. The trainer's own (models.policy) apply the temperature only.
            step_logprobs = self.model.compute_transition_scores(output.sequences, output.scores,
                                                                 normalize_logits=True).cpu()
        responses, truncated, logprobs = [], [], []
        for row, row_logprobs in zip(sequences, step_logprobs):
            stops = torch.isin(row, torch.tensor(stop_ids))
            length = int(stops.nonzero()[0]) + 1 if stops.any() else row.numel()
            responses.append(row[:length].tolist())
            truncated.append(not stops.any() and length == sampling.max_new_tokens)
            logprobs.append(row_logprobs[:length].tolist() if row_logprobs is not None else None)
        return responses, truncated, logprobs

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Drain the stream first (it may be a collective gather that every rank must finish), check it, then copy:
        # a bad stream leaves the model untouched.
        params = self.model.state_dict()
        shapes = {name: p.shape for name, p in params.items()}
        incoming = stack_expert_tensors(dict(named_tensors), shapes)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        check_weight_stream(incoming, shapes, optional=tied)
        for name, tensor in incoming.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.weights_loaded = True
