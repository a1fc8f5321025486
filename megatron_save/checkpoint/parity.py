"""Checks a converted checkpoint against the transformers model it came from, at the current TP / PP."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file

from megatron_save.checkpoint.hf import VALUE_HEAD_FILE, VALUE_HEAD_TENSOR
from megatron_save.checkpoint.model_checkpoint import build_model_from_checkpoint
from megatron_save.models.builder import ModelKind
from megatron_save.models.forward import gather_vocab_logits, pipeline_forward, score_sequences
from megatron_save.models.policy import sequence_logprobs


def transformers_output(
    hf_dir: str | Path,
    reward_model: bool,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference output of the HF model in fp32: [B, S, V] logits of a causal LM, [B] rewards of a reward
    model, or [B, 2] (reward, value) given ``prompt_lengths`` and the ``VALUE_HEAD_FILE`` side file."""
    auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask.long()).logits
        if not reward_model or prompt_lengths is None:
            return logits if not reward_model else logits[:, 0]
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # [B, S, H]
    value_weight = load_file(Path(hf_dir) / VALUE_HEAD_FILE)[VALUE_HEAD_TENSOR]  # [1, H]
    prompt_hidden = hidden[torch.arange(input_ids.shape[0]), prompt_lengths - 1]  # [B, H]
    return torch.stack([logits[:, 0], (prompt_hidden @ value_weight.T)[:, 0]], dim=1)


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
