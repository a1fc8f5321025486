"""Loss functions of the training stages: they read the heads' per-token outputs and call `algorithms`."""

from __future__ import annotations

import torch

from megatron_save.algorithms import (
    bt_loss,
    highest_lowest_pairs,
    hl_bt_loss,
    implicit_prm_loss,
    mean_reward_anchor,
    pairwise_accuracy,
    save_reward_loss,
    value_anchor_loss,
)
from megatron_save.data.batching import ImplicitPrmBatch, PairBatch, PromptTargetBatch, ResponseGroupBatch
from megatron_save.models.forward import at_last_token
from megatron_save.models.policy import token_logprobs


def bt_pair_loss(batch: PairBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1 (eq. 11) over the pairs of a micro-batch; rows alternate chosen, rejected."""
    rewards = at_last_token(scores, batch.attention_mask)[:, 0]  # [2b]
    chosen, rejected = rewards[0::2], rewards[1::2]  # [b], [b]
    loss = bt_loss(chosen, rejected)
    return loss, {"loss": loss, "accuracy": pairwise_accuracy(chosen, rejected)}


def value_regression_loss(
    batch: PromptTargetBatch, scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 2 (eq. 12): (V(x) - mean frozen reward)^2, V read at the prompt's last token."""
    heads = at_last_token(scores, batch.attention_mask)  # [b, 2]
    values, rewards = heads[:, 1], heads[:, 0]
    targets = batch.targets.to(values.device)[:, None]  # [b, 1]: one "response", the precomputed mean
    loss = value_anchor_loss(values, targets, torch.ones_like(targets, dtype=torch.bool))
    # The reward head's output joins with weight zero so that every pipeline stage has a gradient to pass back
    # (the value head reads a detached state); the backbone's learning rate is zero in stage 2.
    return loss + 0.0 * rewards.sum(), {"loss": loss}


def save_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor, value_loss_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAVE's RM update on the groups of a micro-batch: eqs. 18-20 (reward loss over prompts kept by the
    partition, V stop-gradient) + value_loss_weight x eq. 21 (value loss over all prompts, R stop-gradient).

    Returns micro-batch sums scaled so that Megatron's averaging over micro-batches and data-parallel ranks yields
    the means over the whole batch. scores [k * G, S, 2] -> scalar.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards, valid = _group_rewards(batch, scores)  # [k, G]
    values = scores[rows, (batch.prompt_lengths - 1).to(scores.device), 1].view(-1, batch.group_size)[:, 0]  # [k]
    pos = batch.pos_mask.to(scores.device).view(-1, batch.group_size)
    neg = batch.neg_mask.to(scores.device).view(-1, batch.group_size)
    keep = pos.any(dim=1) & neg.any(dim=1)  # [k]
    reward_sum = save_reward_loss(rewards, values, pos, neg, keep) * keep.sum()
    value_sum = value_anchor_loss(values, rewards, valid) * valid.any(dim=1).sum()
    loss = batch.reward_scale * reward_sum + value_loss_weight * batch.value_scale * value_sum
    return loss, {"reward_loss_sum": reward_sum, "value_loss_sum": value_sum, "kept_prompts": keep.sum().float()}


def _group_rewards(batch: ResponseGroupBatch, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R at each response's last token as [k, G] groups, and the valid mask [k, G]."""
    rewards = at_last_token(scores, batch.attention_mask)[:, 0].view(-1, batch.group_size)
    return rewards, batch.valid.to(scores.device).view(-1, batch.group_size)


def mean_reward_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Mean Reward baseline: SAVE's contrastive loss (eqs. 18-20) with each group's mean reward
    (stop-gradient) as the anchor in place of V(x); no value loss. Scaled as ``save_rm_loss``."""
    rewards, valid = _group_rewards(batch, scores)  # [k, G]
    anchor = mean_reward_anchor(rewards, valid)  # [k]
    pos = batch.pos_mask.to(scores.device).view(-1, batch.group_size)
    neg = batch.neg_mask.to(scores.device).view(-1, batch.group_size)
    keep = pos.any(dim=1) & neg.any(dim=1)
    reward_sum = save_reward_loss(rewards, anchor, pos, neg, keep) * keep.sum()
    return batch.reward_scale * reward_sum, {"reward_loss_sum": reward_sum, "kept_prompts": keep.sum().float()}


def hl_bt_rm_loss(batch: ResponseGroupBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The HL-BT baseline: Bradley-Terry on each group's highest vs lowest reward response. ``reward_scale``
    turns the micro-batch's sum over pairs into the whole batch's mean over pairs."""
    rewards, valid = _group_rewards(batch, scores)  # [k, G]
    pairs = highest_lowest_pairs(rewards, valid)[2].sum()
    reward_sum = hl_bt_loss(rewards, valid) * pairs
    return batch.reward_scale * reward_sum, {"reward_loss_sum": reward_sum, "pairs": pairs.float()}


def prime_prm_loss(batch: ImplicitPrmBatch, logits: torch.Tensor, beta: float = 0.05
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRIME's implicit-PRM cross-entropy (its eq. 4) on a micro-batch, with log-probs from the vocabulary-parallel
    logits [b, S, V / TP]; metrics are row-weighted like the loss (their averages are the batch's means)."""
    logp = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])  # [b, S - 1]
    device = logp.device
    losses, sequence_rewards = implicit_prm_loss(logp, batch.ref_logp.to(device), batch.loss_mask.to(device),
                                                 batch.labels.to(device), beta)  # [b], [b]
    weights = batch.loss_scale.to(device)
    correct = ((sequence_rewards > 0).float() == (batch.labels.to(device) > 0.5).float()).float()
    return (weights * losses).sum(), {"prm_loss": (weights * losses).sum().detach(),
                                      "prm_accuracy": (weights * correct).sum()}
