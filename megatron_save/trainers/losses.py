"""Loss functions of the training stages: they read the heads' per-token outputs and call `algorithms`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
from megatron_save.data.batching import (
    ImplicitPrmBatch,
    PairBatch,
    PromptTargetBatch,
    ResponseGroupBatch,
    ScoredRowBatch,
)
from megatron_save.models.forward import at_last_token
from megatron_save.models.policy import token_logprobs


def bt_pair_loss(batch: PairBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1 (eq. 11) over the pairs of a micro-batch; rows alternate chosen, rejected."""
    rewards = at_last_token(scores, batch.attention_mask)[:, 0]  # [2b]
    chosen, rejected = rewards[0::2], rewards[1::2]  # [b], [b]
    loss = bt_loss(chosen, rejected)
    scale = batch.loss_scale  # a token-budget micro-batch's share (1 for fixed ones); the metrics average alike
    return scale * loss, {"loss": scale * loss, "accuracy": scale * pairwise_accuracy(chosen, rejected)}


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
    loss = batch.loss_scale * loss  # a token-budget micro-batch's share (1 for fixed ones)
    return loss + 0.0 * rewards.sum(), {"loss": loss}


# The outputs every reward-model loss on rollouts returns beside the loss, per micro-batch: the scores the step
# logs and partitions with (this forward's, not a second one), and the sums the update normalises.
ROLLOUT_LOSS_OUTPUTS = ("rewards", "values", "reward_loss_sum", "reward_count", "value_loss_sum")


@dataclass
class GroupLossTerms:
    """A rollout strategy's loss over groups, as functions of their scores alone: what lets a group span
    micro-batches (the gradient cache of a token-budget update)."""

    reward_sum: torch.Tensor
    """Scalar: the reward term summed over what it averages (kept prompts, or HL-BT's pairs)."""
    reward_count: torch.Tensor
    """Scalar: that count."""
    value_sum: torch.Tensor | None = None
    """Scalar: eq. 21 summed over the prompts with a trained response (None without a value loss)."""


def save_group_terms(rewards: torch.Tensor, values: torch.Tensor | None, trained: torch.Tensor, threshold: float,
                     grades: torch.Tensor | None = None) -> GroupLossTerms:
    """SAVE on k groups: the partition at mu(t) = ``threshold`` (eqs. 13-17) over the trained responses, the
    reward loss (eqs. 18-20, V stop-gradient) summed over the kept prompts B~ and the value loss (eq. 21, R
    stop-gradient) summed over prompts with a trained response. rewards [k, G], values [k], trained [k, G]."""
    pos, neg, keep = save_partition(rewards, values, trained, threshold)  # [k, G], [k, G], [k]
    reward_sum = save_reward_loss(rewards, values, pos, neg, keep) * keep.sum()
    value_sum = value_anchor_loss(values, rewards, trained) * trained.any(dim=1).sum()
    return GroupLossTerms(reward_sum, keep.sum(), value_sum)


def mean_reward_group_terms(rewards: torch.Tensor, values: torch.Tensor | None, trained: torch.Tensor,
                            threshold: float, grades: torch.Tensor | None = None) -> GroupLossTerms:
    """The Mean Reward baseline on k groups: SAVE's partition and contrastive loss with each group's mean reward
    (stop-gradient) as the anchor, summed over B~; no value loss. rewards / trained [k, G]."""
    anchor = mean_reward_anchor(rewards, trained)  # [k]
    pos, neg, keep = save_partition(rewards, anchor, trained, threshold)
    return GroupLossTerms(save_reward_loss(rewards, anchor, pos, neg, keep) * keep.sum(), keep.sum())


def hl_bt_group_terms(rewards: torch.Tensor, values: torch.Tensor | None, trained: torch.Tensor, threshold: float,
                      grades: torch.Tensor | None = None) -> GroupLossTerms:
    """HL-BT on k groups: Bradley-Terry on each group's highest vs lowest trained response, ranked by the reward
    model's scores or by ``grades`` [k, G] where given, summed over pairs. rewards / trained [k, G]."""
    pairs = highest_lowest_pairs(rewards if grades is None else grades, trained)[2].sum()
    return GroupLossTerms(hl_bt_loss(rewards, trained, grades) * pairs, pairs)


def save_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor, value_loss_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAVE's RM update on the groups of a micro-batch, from this forward alone: ``save_group_terms`` of its R and V.

    The reward term enters as the micro-batch's sum (its gradient is divided by the batch's |B~| once the pass has
    counted it); the value term is already the batch mean. The two touch disjoint parameters (the value head reads
    a detached state), which is what lets them be normalised apart. scores [k * G, S, 2] -> scalar.
    """
    rewards, values, trained = _group_scores(batch, scores)  # [k, G], [k], [k, G]
    terms = save_group_terms(rewards, values, trained, batch.threshold)
    loss = batch.sum_scale * terms.reward_sum + value_loss_weight * batch.value_scale * terms.value_sum
    return loss, _outputs(rewards, values, terms.reward_sum, terms.reward_count, terms.value_sum)


def mean_reward_rm_loss(
    batch: ResponseGroupBatch, scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Mean Reward baseline on the groups of a micro-batch (``mean_reward_group_terms``), the sum over B~ as
    ``save_rm_loss``."""
    rewards, values, trained = _group_scores(batch, scores)  # [k, G], [k] or None, [k, G]
    terms = mean_reward_group_terms(rewards, values, trained, batch.threshold)
    return batch.sum_scale * terms.reward_sum, _outputs(rewards, values, terms.reward_sum, terms.reward_count)


def hl_bt_rm_loss(batch: ResponseGroupBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The HL-BT baseline on the groups of a micro-batch (``hl_bt_group_terms``), ranked by a verifier's grades
    where the batch carries them (``batch.grades``); the sum over pairs (divided by the batch's pairs after the
    pass)."""
    rewards, values, trained = _group_scores(batch, scores)  # [k, G]
    grades = None if batch.grades is None else batch.grades.to(scores.device).view(-1, batch.group_size)  # [k, G]
    terms = hl_bt_group_terms(rewards, values, trained, batch.threshold, grades)
    return batch.sum_scale * terms.reward_sum, _outputs(rewards, values, terms.reward_sum, terms.reward_count)


GroupTermsFn = Callable[..., GroupLossTerms]


def group_loss_gradients(group_terms: GroupTermsFn, rewards: torch.Tensor, values: torch.Tensor | None,
                         trained: torch.Tensor, threshold: float, grades: torch.Tensor | None,
                         value_loss_weight: float) -> tuple[GroupLossTerms, torch.Tensor, torch.Tensor | None]:
    """The gradient cache of a rollout update: the whole batch's objective J = reward_sum + value_loss_weight x
    value_sum / (prompts with a trained response) -- what the fixed micro-batches' losses add up to after
    Megatron's averaging, before the update divides the reward term by its count -- as a function of the scores
    alone, and dJ/dR [B, G], dJ/dV [B] (None without values) by autograd, so that a forward-backward of
    sum(R x dJ/dR + V x dJ/dV) over any split of the rows gives the parameters J's gradient. Returns the terms
    (detached) and the two gradients. rewards / trained [B, G], values [B] or None, grades [B, G] or None."""
    leaf_rewards = rewards.detach().clone().requires_grad_(True)
    leaf_values = None if values is None else values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        terms = group_terms(leaf_rewards, leaf_values, trained, threshold, grades)
        objective = terms.reward_sum
        value_count = int(trained.any(dim=1).sum())
        if terms.value_sum is not None and value_count:
            objective = objective + value_loss_weight * terms.value_sum / value_count
        leaves = [leaf_rewards] + ([] if leaf_values is None else [leaf_values])
        grads = torch.autograd.grad(objective, leaves, allow_unused=True) if objective.requires_grad else \
            [None] * len(leaves)
    grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
    detached = GroupLossTerms(terms.reward_sum.detach(), terms.reward_count.detach(),
                              None if terms.value_sum is None else terms.value_sum.detach())
    return detached, grads[0], None if leaf_values is None else grads[1]


def gradient_cache_loss(batch: ScoredRowBatch, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The surrogate of a token-budget rollout update on one micro-batch of rows: loss_scale x sum(R x dJ/dR +
    V x dJ/dV) with the cached upstream gradients (zero in the scoring pass), whose parameter gradient is the
    rows' share of the whole batch's; returns the rows' R and V (NaN without a value head) as metrics.
    scores [n, S, heads] -> scalar."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards = at_last_token(scores, batch.attention_mask)[:, 0]  # [n]
    loss = (rewards * batch.reward_grad.to(scores.device)).sum()
    values = torch.full_like(rewards, float("nan"))
    if scores.shape[-1] > 1:
        values = scores[rows, (batch.prompt_lengths - 1).to(scores.device), 1]  # [n]
        loss = loss + (values * batch.value_grad.to(scores.device)).sum()
    return batch.loss_scale * loss, {"rewards": rewards, "values": values}


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
