"""Checks a converted checkpoint against the transformers model it came from, at the current TP / PP.

``parity_report`` runs one Megatron build and one transformers forward over a batch of real text (by default
``CHAT_SAMPLE`` rendered with the checkpoint's tokenizer) and returns a ``ParityReport``; the metrics behind it
(``relative_difference``, ``top1_agreement``, ...) are small pure functions. ``tools/check_parity.py`` is the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state
from safetensors.torch import load_file

from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR
from megatron_save.checkpoint.model_checkpoint import build_model_from_checkpoint
from megatron_save.data.chat import Messages, encode_conversation
from megatron_save.distributed.init import compute_device
from megatron_save.models.builder import ModelKind
from megatron_save.models.forward import gather_vocab_logits, pipeline_forward, score_sequences
from megatron_save.models.policy import sequence_logprobs
from megatron_save.utils.tensors import pad_rows


def load_transformers_model(hf_dir: str | Path, reward_model: bool) -> Any:
    """The HF causal LM or ``*ForSequenceClassification`` model of ``hf_dir`` in fp32, in eval mode."""
    auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    return auto.from_pretrained(hf_dir, dtype=torch.float32).eval()


def classifier_rewards(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards of a ``*ForSequenceClassification`` model over right-padded rows [B, S], each as transformers
    scores that sequence alone: the padding is filled with ``config.pad_token_id`` (the classifier reads each row
    at its last token that is not the pad token, so any other filler would be read as a real token); a config
    without a pad token is run one unpadded row at a time (transformers refuses a batch then)."""
    pad = model.config.pad_token_id
    with torch.no_grad():
        if pad is None:
            return torch.cat([model(input_ids=row[keep][None]).logits[:, 0] for row, keep in zip(input_ids, mask)])
        filled = torch.where(mask, input_ids, pad)
        return model(input_ids=filled, attention_mask=mask.long()).logits[:, 0]


def transformers_output(
    hf_dir: str | Path,
    reward_model: bool,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference output of the HF model in fp32: [B, S, V] logits of a causal LM, [B] rewards of a reward
    model (``classifier_rewards``), or [B, 2] (reward, value) given ``prompt_lengths`` and the
    ``VALUE_HEAD_FILE`` side file."""
    return reference_output(load_transformers_model(hf_dir, reward_model), hf_dir, reward_model, input_ids, mask,
                            prompt_lengths)


def reference_output(model: Any, hf_dir: str | Path, reward_model: bool, input_ids: torch.Tensor,
                     mask: torch.Tensor, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``transformers_output`` of an already loaded ``model`` (``hf_dir`` holds its value-head side file)."""
    if not reward_model:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask.long()).logits
    rewards = classifier_rewards(model, input_ids, mask)  # [B]
    if prompt_lengths is None:
        return rewards
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # [B, S, H]
    value_weight = load_file(Path(hf_dir) / VALUE_HEAD_FILE)[VALUE_HEAD_TENSOR]  # [1, H]
    prompt_hidden = hidden[torch.arange(input_ids.shape[0]), prompt_lengths - 1]  # [B, H]
    return torch.stack([rewards, (prompt_hidden @ value_weight.T)[:, 0]], dim=1)


# --- RoPE: the rotary inverse frequencies of both sides ---------------------------------------------------------

ROPE_RTOL = 2e-6
"""Tolerance of ``rope_relative_difference``. Both sides compute theta ** (-2i / d) and the Llama-3 scaling with
the same fp32 operations: on CPU they agree bit for bit (measured: 0 for every family and rope type). On a GPU,
Megatron computes them there, where powf and division may be a few ulp off (an fp32 ulp is at most 1.2e-7
relative; not measured yet): 2e-6 leaves room for about 16 ulp. A Llama-3 factor of 8 for 32 gives 3 (the low
frequencies move by a factor of 4)."""


def megatron_inverse_frequencies(model: Any) -> torch.Tensor:
    """[d / 2] fp32 rotary inverse frequencies of a Megatron GPTModel (every pipeline stage holds them)."""
    return model.rotary_pos_emb.inv_freq.detach().float().cpu()


def transformers_inverse_frequencies(model: Any) -> torch.Tensor:
    """[d / 2] fp32 rotary inverse frequencies of a transformers decoder (LM or classifier) of our families."""
    return model.base_model.rotary_emb.inv_freq.detach().float().cpu()


def rope_relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max over frequencies of |ours - reference| / |reference|: per entry, since the low frequencies that RoPE
    scaling changes are 1e-6 of the highest (a ratio to the largest would not see them). inf on a shape
    mismatch, NaN anywhere gives NaN."""
    if ours.shape != reference.shape:
        return math.inf
    ratio = (ours.double() - reference.double()).abs() / reference.double().abs()
    return ratio.max().item() if not ratio.isnan().any() else math.nan


def max_abs_diff_vs_transformers(
    ckpt_dir: str | Path,
    hf_dir: str | Path,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    micro_batch_size: int = 1,
    prompt_lengths: torch.Tensor | None = None,
) -> float:
    """Collective: max |Megatron - transformers| over real tokens (LM logits) or sequences (RM scores; also the
    value head, read at ``prompt_lengths - 1``, when the checkpoint has one and prompt lengths are given).

    ``input_ids`` [B, S] is right-padded with ``mask`` [B, S] marking real tokens. Every rank returns the
    same figure (the maximum over ranks that hold outputs).
    """
    model, meta, _ = build_model_from_checkpoint(ckpt_dir)
    reward_model = meta.kind == ModelKind.REWARD_MODEL.value
    diff = torch.zeros(())
    if reward_model:
        prompt_lengths = prompt_lengths if meta.value_head else None
        scores = score_sequences(model, input_ids, mask, micro_batch_size, prompt_lengths)  # on every rank
        ours = scores.rewards if scores.values is None else torch.stack([scores.rewards, scores.values], dim=1)
        reference = transformers_output(hf_dir, True, input_ids, mask, prompt_lengths)
        diff = (ours.float().cpu() - reference).abs().max()
    else:
        logits = pipeline_forward(model, input_ids, micro_batch_size)  # [B, S, V / TP] on the last stage
        if logits is not None:
            full = gather_vocab_logits(logits).float().cpu()
            diff = (full - transformers_output(hf_dir, False, input_ids, mask)).abs()[mask].max()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    diff = diff.to(device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def max_logprob_diff_vs_transformers(
    ckpt_dir: str | Path, hf_dir: str | Path, input_ids: torch.Tensor, mask: torch.Tensor, micro_batch_size: int = 1
) -> tuple[float, float]:
    """Collective, causal LMs: max |difference| of per-token log-probs and of entropies over real next tokens."""
    model, _, _ = build_model_from_checkpoint(ckpt_dir)
    ours = sequence_logprobs(model, input_ids, micro_batch_size)  # [B, S - 1] on every rank
    log_probs = torch.log_softmax(transformers_output(hf_dir, False, input_ids, mask)[:, :-1], dim=-1)
    reference_logp = log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
    reference_entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    real = mask[:, 1:]
    return ((ours.logp.cpu() - reference_logp).abs()[real].max().item(),
            (ours.entropy.cpu() - reference_entropy).abs()[real].max().item())


# --- Parity on real text: the sample, the batch, the metrics and the report -----------------------------------

CHAT_SAMPLE: tuple[Messages, ...] = (
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris, on the river Seine."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Grey waves fold and break,\nsalt wind combs the empty shore,\n"
                                      "gulls argue with foam."}],
    [{"role": "user", "content": "How do I reverse a list in Python?"},
     {"role": "assistant", "content": "Use slicing, items[::-1], for a reversed copy, or items.reverse() to "
                                      "reverse the list in place."}],
    [{"role": "user", "content": "I have 3 apples and eat one. How many are left?"},
     {"role": "assistant", "content": "You have 2 apples left, because 3 - 1 = 2."},
     {"role": "user", "content": "And if I buy 5 more?"},
     {"role": "assistant", "content": "Then you have 7 apples: 2 + 5 = 7."}],
    [{"role": "user", "content": "Give me one tip for sleeping better."},
     {"role": "assistant", "content": "Keep a regular schedule: go to bed and get up at the same time every day, "
                                      "weekends included."}],
    [{"role": "user", "content": "Is it safe to look at the sun through sunglasses?"},
     {"role": "assistant", "content": "No. Sunglasses do not block enough light; use certified eclipse glasses "
                                      "or a pinhole projector instead."}],
)
"""The default input of a parity check: short user / assistant conversations in plain ASCII (every tokenizer,
the tiny character tokenizer included, encodes them without unknown tokens)."""

DEFAULT_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
"""Default relative tolerance per checkpoint dtype: a correct TP / PP split in fp32 is ~1e-6 off (summation order);
bf16 weights and activations are ~1e-2 off an fp32 reference."""
DEFAULT_MIN_TOP1 = {"fp32": 0.98, "bf16": 0.90}
"""Default minimum top-1 agreement per checkpoint dtype (near-ties may flip under rounding, more so in bf16)."""


def render_plain(conversation: Messages) -> str:
    """A conversation as plain text, one "Role: content" paragraph per turn (for tokenizers without a chat
    template)."""
    return "\n\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in conversation)


def chat_sequences(tokenizer: Any, conversations: tuple[Messages, ...] = CHAT_SAMPLE) -> list[list[int]]:
    """Token ids of each conversation, rendered with the tokenizer's chat template (as reward-bench scores a
    conversation: no generation prompt) when it has one, else as plain text (``render_plain``)."""
    if getattr(tokenizer, "chat_template", None):
        return [encode_conversation(tokenizer, list(conversation)) for conversation in conversations]
    return [tokenizer(render_plain(conversation))["input_ids"] for conversation in conversations]


def text_paragraphs(text: str) -> list[str]:
    """The non-empty paragraphs of a plain text: blocks separated by blank lines, stripped (the lines of one
    paragraph stay together, with their newlines)."""
    return [paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def text_sequences(tokenizer: Any, text: str) -> list[list[int]]:
    """Token ids of each paragraph of ``text`` (``text_paragraphs``), one sequence each."""
    return [tokenizer(paragraph)["input_ids"] for paragraph in text_paragraphs(text)]


@dataclass(frozen=True)
class ParityBatch:
    """Right-padded token sequences that both models are run on."""

    input_ids: torch.Tensor
    """[B, S] token ids, each row's real tokens first, then padding."""
    mask: torch.Tensor
    """[B, S] bool, True on real tokens."""
    prompt_lengths: torch.Tensor
    """[B] a value head is read at prompt_lengths - 1: half of each row's real tokens (at least 1), a position as
    good as any for parity."""


def parity_batch(sequences: list[list[int]], pad_id: int, max_length: int) -> ParityBatch:
    """Sequences cut to their first ``max_length`` tokens, those of fewer than 2 tokens dropped (no next token to
    predict), right-padded with ``pad_id``; ValueError when none is left."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: a sequence needs at least 2 tokens")
    kept = [list(sequence[:max_length]) for sequence in sequences if len(sequence) >= 2]
    if not kept:
        raise ValueError("no sequence of at least 2 tokens")
    input_ids, mask = pad_rows(kept, pad_id)
    return ParityBatch(input_ids=input_ids, mask=mask, prompt_lengths=(mask.sum(dim=1) // 2).clamp(min=1))


def _real(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, S, ...] -> [N, ...] entries at the N real tokens of ``mask`` [B, S]; without a mask, every entry."""
    return tensor if mask is None else tensor[mask]


def max_abs_difference(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours - reference| over real tokens: [B, S, ...] twice and mask [B, S], or equal shapes and no mask
    (every entry). NaN anywhere gives NaN."""
    diff = (_real(ours, mask).float() - _real(reference, mask).float()).abs()
    return diff.max().item() if not diff.isnan().any() else math.nan


def relative_difference(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |ours - reference| / max |reference|, both over the same real entries (shapes as max_abs_difference):
    the largest error on the scale of the outputs, not per entry (a ratio per entry blows up at logits near 0).
    0 when both are all 0, inf when only the reference is."""
    diff = max_abs_difference(ours, reference, mask)
    scale = _real(reference, mask).float().abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def top1_agreement(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of real tokens at which both models' most likely next token (argmax) is the same.
    [B, S, V] logits twice, mask [B, S] -> a number in [0, 1]."""
    same = ours.argmax(dim=-1) == reference.argmax(dim=-1)  # [B, S]
    return same[mask].float().mean().item()


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) under ``logits``. [B, S, V], [B, S] -> [B, S - 1] fp32."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S - 1, V]
    return log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]


def ranking_agreement(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of the pairs (i, j) of the batch that both sets of scores order the same way, over the pairs the
    reference does not tie (1 when there is none). [B], [B] -> a number in [0, 1]."""
    ours_order = torch.sign(ours[:, None] - ours[None, :])  # [B, B]
    reference_order = torch.sign(reference[:, None] - reference[None, :])  # [B, B]
    pairs = torch.ones_like(reference_order, dtype=torch.bool).triu(diagonal=1) & (reference_order != 0)
    if not pairs.any():
        return 1.0
    return (ours_order == reference_order)[pairs].float().mean().item()


@dataclass(frozen=True)
class ParityReport:
    """How far a Megatron checkpoint's outputs are from transformers' (in fp32) on one batch."""

    kind: str
    """``causal_lm`` or ``reward_model`` (a ModelKind value)."""
    sequences: int
    """Rows of the batch."""
    tokens: int
    """Real tokens of the batch."""
    max_abs_diff: float
    """max |Megatron - transformers| of the logits over real tokens (causal LM) or of the rewards (reward model)."""
    max_rel_diff: float
    """max_abs_diff / max |transformers| over the same entries (relative_difference)."""
    top1_agreement: float | None = None
    """Causal LM: fraction of real tokens whose argmax next token agrees; None for a reward model (no top-1)."""
    max_logprob_diff: float | None = None
    """Causal LM: max |log p| difference of the actual next tokens (Megatron's from sequence_logprobs)."""
    ranking_agreement: float | None = None
    """Reward model: pairwise ranking agreement of the rewards across the batch (reported, not gated)."""
    value_max_abs_diff: float | None = None
    """Reward model with a value head: max |V difference| (V read at prompt_lengths - 1); else None."""
    value_max_rel_diff: float | None = None
    """Reward model with a value head: value_max_abs_diff / max |V of transformers|; else None."""
    rope_max_rel_diff: float | None = None
    """max relative difference of the rotary inverse frequencies (``rope_relative_difference``), gated at
    ``ROPE_RTOL`` whatever the dtype; None when not compared."""


def causal_lm_report(
    ours_logits: torch.Tensor,
    ours_logp: torch.Tensor,
    reference_logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
) -> ParityReport:
    """The report of a causal LM: logits [B, S, V] of each side, Megatron's next-token log-probs [B, S - 1],
    input_ids and mask [B, S]."""
    return ParityReport(
        kind=ModelKind.CAUSAL_LM.value,
        sequences=input_ids.shape[0],
        tokens=int(mask.sum()),
        max_abs_diff=max_abs_difference(ours_logits, reference_logits, mask),
        max_rel_diff=relative_difference(ours_logits, reference_logits, mask),
        top1_agreement=top1_agreement(ours_logits, reference_logits, mask),
        max_logprob_diff=max_abs_difference(ours_logp, next_token_logprobs(reference_logits, input_ids), mask[:, 1:]),
    )


def reward_model_report(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> ParityReport:
    """The report of a reward model: rewards [B] of each side, or [B, 2] (reward, value) with a value head;
    mask [B, S] of the batch."""
    ours, reference = ours.float().reshape(ours.shape[0], -1), reference.float().reshape(reference.shape[0], -1)
    values = ours.shape[1] > 1
    return ParityReport(
        kind=ModelKind.REWARD_MODEL.value,
        sequences=mask.shape[0],
        tokens=int(mask.sum()),
        max_abs_diff=max_abs_difference(ours[:, 0], reference[:, 0]),
        max_rel_diff=relative_difference(ours[:, 0], reference[:, 0]),
        ranking_agreement=ranking_agreement(ours[:, 0], reference[:, 0]),
        value_max_abs_diff=max_abs_difference(ours[:, 1], reference[:, 1]) if values else None,
        value_max_rel_diff=relative_difference(ours[:, 1], reference[:, 1]) if values else None,
    )


def parity_failures(report: ParityReport, rtol: float, min_top1: float) -> list[str]:
    """What fails the thresholds, one phrase each (empty: the checkpoint passes). Relative differences (rewards
    and values too) must be <= ``rtol``, top-1 agreement (causal LMs) >= ``min_top1``; NaN fails."""
    failures = []
    if not report.max_rel_diff <= rtol:
        failures.append(f"rel {report.max_rel_diff:.1e} > rtol {_number(rtol)}")
    if report.value_max_rel_diff is not None and not report.value_max_rel_diff <= rtol:
        failures.append(f"value rel {report.value_max_rel_diff:.1e} > rtol {_number(rtol)}")
    if report.top1_agreement is not None and not report.top1_agreement >= min_top1:
        failures.append(f"top-1 {report.top1_agreement:.1%} < min {min_top1:.1%}")
    if report.rope_max_rel_diff is not None and not report.rope_max_rel_diff <= ROPE_RTOL:
        failures.append(f"rope inverse frequencies rel {report.rope_max_rel_diff:.1e} > {_number(ROPE_RTOL)}")
    return failures


def verdict_line(report: ParityReport, rtol: float, min_top1: float) -> str:
    """The report and the thresholds in one line, ending in ``OK`` or ``MISMATCH (<failures>)``."""
    if report.kind == ModelKind.CAUSAL_LM.value:
        parts = [f"max |megatron - transformers| {report.max_abs_diff:.1e}",
                 f"rel {report.max_rel_diff:.1e} (rtol {_number(rtol)})",
                 f"top-1 {report.top1_agreement:.1%} (min {min_top1:.1%})",
                 f"max |dlogp| {report.max_logprob_diff:.1e}"]
    else:
        parts = [f"max |reward difference| {report.max_abs_diff:.1e}",
                 f"rel {report.max_rel_diff:.1e} (rtol {_number(rtol)})"]
        if report.value_max_rel_diff is not None:
            parts += [f"max |value difference| {report.value_max_abs_diff:.1e}",
                      f"value rel {report.value_max_rel_diff:.1e} (rtol {_number(rtol)})"]
        parts.append(f"ranking agreement {report.ranking_agreement:.1%} (no top-1 for a reward model; not gated)")
    if report.rope_max_rel_diff is not None:
        parts.append(f"rope inverse frequencies rel {report.rope_max_rel_diff:.1e} (max {_number(ROPE_RTOL)})")
    failures = parity_failures(report, rtol, min_top1)
    return ", ".join(parts) + (f": MISMATCH ({'; '.join(failures)})" if failures else ": OK")


def _number(value: float) -> str:
    """A threshold as short as it reads exactly: 1e-04, 2e-02, 1.5e-04."""
    short = f"{value:.0e}"
    return short if float(short) == value else f"{value:.2e}"


def _reporting_rank() -> int:
    """Collective: the global rank of the last pipeline stage's first tensor- and data-parallel rank (it holds
    every output), the same on every rank."""
    holds = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
             and parallel_state.get_data_parallel_rank() == 0)
    rank = torch.tensor(dist.get_rank() if holds else -1, device=compute_device())
    dist.all_reduce(rank, op=dist.ReduceOp.MAX)
    return int(rank.item())


def parity_report(
    ckpt_dir: str | Path, hf_dir: str | Path, batch: ParityBatch, micro_batch_size: int = 1,
    spec_backend: str = "auto",
) -> ParityReport:
    """Collective: the checkpoint's model, built once under the current parallel state, against ONE transformers
    forward (fp32) over ``batch``, and its rotary inverse frequencies against transformers'; every rank returns
    the same report.

    A causal LM runs twice over the batch (full logits, then log-probs through the vocab-parallel cross entropy,
    as the policy reads them); a reward model once (R, and V when the checkpoint has a value head). The
    reference runs on one rank only (``_reporting_rank``), after the Megatron model is dropped.
    """
    model, meta, _ = build_model_from_checkpoint(ckpt_dir, spec_backend=spec_backend)
    reporter = _reporting_rank()
    mine = dist.get_rank() == reporter
    input_ids, mask = batch.input_ids, batch.mask
    ours_inv_freq = megatron_inverse_frequencies(model)
    report = None
    if meta.kind == ModelKind.REWARD_MODEL.value:
        prompt_lengths = batch.prompt_lengths if meta.value_head else None
        scores = score_sequences(model, input_ids, mask, micro_batch_size, prompt_lengths)  # on every rank
        del model
        if mine:
            ours = scores.rewards if scores.values is None else torch.stack([scores.rewards, scores.values], dim=1)
            hf_model = load_transformers_model(hf_dir, True)
            reference = reference_output(hf_model, hf_dir, True, input_ids, mask, prompt_lengths)  # [B] or [B, 2]
            report = reward_model_report(ours.float().cpu(), reference, mask)
    else:
        logits = pipeline_forward(model, input_ids, micro_batch_size)  # [B, S, V / TP] on the last stage
        full = None if logits is None else gather_vocab_logits(logits).float().cpu()  # [B, S, V]
        del logits
        logp = sequence_logprobs(model, input_ids, micro_batch_size).logp.cpu()  # [B, S - 1] on every rank
        del model
        if mine:
            hf_model = load_transformers_model(hf_dir, False)
            reference = reference_output(hf_model, hf_dir, False, input_ids, mask)  # [B, S, V]
            report = causal_lm_report(full, logp, reference, input_ids, mask)
        del full
    if mine:
        rope = rope_relative_difference(ours_inv_freq, transformers_inverse_frequencies(hf_model))
        report = dataclasses.replace(report, rope_max_rel_diff=rope)
        del hf_model
    shared = [report]
    dist.broadcast_object_list(shared, src=reporter)
    return shared[0]
