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
    save_partition,
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


# The outputs every reward-model loss on rollouts returns beside the loss, per micro-batch: the scores the step
# logs and partitions with (this forward's, not a second one), and the sums the update normalises.
ROLLOUT_LOSS_OUTPUTS = ("rewards", "values", "reward_loss_sum", "reward_count", "value_loss_sum")


def save_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor, value_loss_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAVE's RM update on the groups of a micro-batch, from this forward alone: R and V, the partition at mu(t)
    (eqs. 13-17) over the trained responses, eqs. 18-20 (the reward loss over the kept prompts B~, V
    stop-gradient) + value_loss_weight x eq. 21 (the value loss over prompts with a trained response, R
    stop-gradient).

    The reward term enters as the micro-batch's sum (its gradient is divided by the batch's |B~| once the pass has
    counted it); the value term is already the batch mean. The two touch disjoint parameters (the value head reads
    a detached state), which is what lets them be normalised apart. scores [k * G, S, 2] -> scalar.
    """
    rewards, values, trained = _group_scores(batch, scores)  # [k, G], [k], [k, G]
    pos, neg, keep = save_partition(rewards, values, trained, batch.threshold)  # [k, G], [k, G], [k]
    reward_sum = save_reward_loss(rewards, values, pos, neg, keep) * keep.sum()
    value_sum = value_anchor_loss(values, rewards, trained) * trained.any(dim=1).sum()
    loss = batch.sum_scale * reward_sum + value_loss_weight * batch.value_scale * value_sum
    return loss, _outputs(rewards, values, reward_sum, keep.sum(), value_sum)


def mean_reward_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Mean Reward baseline: SAVE's partition and contrastive loss (eqs. 13-20) with each group's mean reward
    (stop-gradient) as the anchor in place of V(x); no value loss. The sum over B~, as ``save_rm_loss``."""
    rewards, values, trained = _group_scores(batch, scores)  # [k, G], [k] or None, [k, G]
    anchor = mean_reward_anchor(rewards, trained)  # [k]
    pos, neg, keep = save_partition(rewards, anchor, trained, batch.threshold)
    reward_sum = save_reward_loss(rewards, anchor, pos, neg, keep) * keep.sum()
    return batch.sum_scale * reward_sum, _outputs(rewards, values, reward_sum, keep.sum())


def hl_bt_rm_loss(batch: ResponseGroupBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The HL-BT baseline: Bradley-Terry on each group's highest vs lowest trained response, ranked by the reward
    model's own scores, or by a verifier's grades where the batch carries them (``batch.grades``: the pairs are
    then labelled by the truth); the sum over pairs (divided by the batch's pairs after the pass)."""
    rewards, values, trained = _group_scores(batch, scores)  # [k, G]
    grades = None if batch.grades is None else batch.grades.to(scores.device).view(-1, batch.group_size)  # [k, G]
    pairs = highest_lowest_pairs(rewards if grades is None else grades, trained)[2].sum()
    reward_sum = hl_bt_loss(rewards, trained, grades) * pairs
    return batch.sum_scale * reward_sum, _outputs(rewards, values, reward_sum, pairs)


def _group_scores(batch: ResponseGroupBatch, scores: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """R at each response's last token [k, G], V at each prompt's last token [k] (None without a value head; a
    group's slots agree, the first is read), and the trained mask [k, G]."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards = at_last_token(scores, batch.attention_mask)[:, 0].view(-1, batch.group_size)
    values = None
    if scores.shape[-1] > 1:
        values = scores[rows, (batch.prompt_lengths - 1).to(scores.device), 1].view(-1, batch.group_size)[:, 0]
    return rewards, values, batch.trained.to(scores.device).view(-1, batch.group_size)


def _outputs(rewards: torch.Tensor, values: torch.Tensor | None, reward_sum: torch.Tensor, reward_count: torch.Tensor,
             value_sum: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ROLLOUT_LOSS_OUTPUTS of a micro-batch (a missing value is NaN, a missing value loss 0)."""
    values = torch.full(rewards.shape[:1], float("nan"), device=rewards.device) if values is None else values
    return {"rewards": rewards.flatten(), "values": values, "reward_loss_sum": reward_sum,
            "reward_count": reward_count.float(), "value_loss_sum": torch.zeros_like(reward_sum) if value_sum is None
            else value_sum}


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
