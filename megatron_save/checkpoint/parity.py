"""Checks a converted checkpoint against the transformers model it came from, at the current TP / PP."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from megatron_save.checkpoint.model_checkpoint import build_model_from_checkpoint
from megatron_save.models.builder import ModelKind
from megatron_save.models.forward import gather_vocab_logits, pipeline_forward, reward_scores


def transformers_output(hf_dir: str | Path, reward_model: bool, input_ids: torch.Tensor, mask: torch.Tensor):
    """Reference output of the HF model in fp32: [B] scores of a reward model, [B, S, V] logits of a causal LM."""
    auto = transformers.AutoModelForSequenceClassification if reward_model else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask.long()).logits
    return output[:, 0] if reward_model else output


def max_abs_diff_vs_transformers(
    ckpt_dir: str | Path, hf_dir: str | Path, input_ids: torch.Tensor, mask: torch.Tensor, micro_batch_size: int = 1
) -> float:
    """Collective: max |Megatron - transformers| over real tokens (LM logits) or sequences (RM scores).

    ``input_ids`` [B, S] is right-padded with ``mask`` [B, S] marking real tokens. Every rank returns the
    same figure (the maximum over ranks that hold outputs).
    """
    model, meta, _ = build_model_from_checkpoint(ckpt_dir)
    reward_model = meta.kind == ModelKind.REWARD_MODEL.value
    diff = torch.zeros(())
    if reward_model:
        scores = reward_scores(model, input_ids, mask, micro_batch_size)  # [B] on every rank
        diff = (scores.float().cpu() - transformers_output(hf_dir, True, input_ids, mask)).abs().max()
    else:
        logits = pipeline_forward(model, input_ids, micro_batch_size)  # [B, S, V / TP] on the last stage
        if logits is not None:
            full = gather_vocab_logits(logits).float().cpu()
            diff = (full - transformers_output(hf_dir, False, input_ids, mask)).abs()[mask].max()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    diff = diff.to(device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()
