"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards", arXiv 2502.01456): token-level
implicit process rewards of a causal LM against its frozen reference (eq. 3), the cross-entropy update of that
implicit PRM on outcome labels (eq. 4), its accuracy filter (section 3.3), and the advantages that combine the
process rewards' returns with a leave-one-out baseline and the outcome rewards' RLOO (eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_save.algorithms.advantages import discounted_returns, masked_whiten, rloo_advantages

OUTCOME_LABEL_RULES = ("above_group_mean", "top_of_group")


def implicit_process_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
                             ) -> torch.Tensor:
    """r_phi(y_t) = beta * log(pi_phi(y_t | y_<t) / pi_ref(y_t | y_<t)) on response tokens, 0 elsewhere.
    logp, ref_logp [N, T] fp32, mask [N, T] bool -> [N, T]."""
    return (beta * (logp.float() - ref_logp.float())).masked_fill(~mask, 0.0)


def implicit_prm_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME's eq. 4 per sequence: cross-entropy of sigmoid(r_phi(y)) against the outcome label, where
    r_phi(y) = sum_t r_phi(y_t) (ref_logp carries no gradient). logp, ref_logp [N, T], mask [N, T] bool, labels
    [N] in [0, 1] -> (loss [N], sequence rewards r_phi(y) [N])."""
    sequence_rewards = implicit_process_rewards(logp, ref_logp.detach(), mask, beta).sum(dim=1)  # [N]
    loss = F.binary_cross_entropy_with_logits(sequence_rewards, labels.float(), reduction="none")
    return loss, sequence_rewards


def outcome_labels(rewards: torch.Tensor, valid: torch.Tensor, rule: str) -> torch.Tensor:
    """0/1 outcome labels from a scalar reward model's scores, for prompts without a verifier.

    above_group_mean: 1 where R is strictly above the mean of the group's valid responses; top_of_group: 1 on
    the group's highest-scoring valid response (the first on a tie). rewards, valid [B, G] -> [B, G] fp32, 0 on
    invalid slots.
    """
    scores = rewards.float().masked_fill(~valid, 0.0)
    if rule == "above_group_mean":
        mean = scores.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        return ((scores > mean) & valid).float()
    if rule == "top_of_group":
        best = rewards.float().masked_fill(~valid, float("-inf")).argmax(dim=1)  # [B]
        labels = torch.zeros_like(scores)
        labels[torch.arange(len(best)), best] = 1.0
        return labels * valid
    raise ValueError(f"unknown outcome label rule {rule!r}; one of {', '.join(OUTCOME_LABEL_RULES)}")


def accuracy_filter(labels: torch.Tensor, valid: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """PRIME's filter: prompts whose mean outcome label over valid responses lies in [low, high] (too easy or too
    hard prompts are left out of both updates). labels, valid [B, G] -> [B] bool (False without a valid one)."""
    count = valid.sum(dim=1)
    accuracy = labels.float().masked_fill(~valid, 0.0).sum(dim=1) / count.clamp(min=1)  # [B]
    return (count > 0) & (accuracy >= low) & (accuracy <= high)


def prime_advantages(process_rewards: torch.Tensor, token_mask: torch.Tensor, outcome: torch.Tensor,
                     kept: torch.Tensor, process_coef: float, outcome_coef: float, gamma: float = 1.0,
                     whiten: bool = True) -> torch.Tensor:
    """PRIME's eq. 5, each source weighted, optionally whitened over the batch's response tokens (its released
    code does):

        A_t^i = process_coef * sum_{s >= t} gamma^(s - t) [r_phi(y_s^i) - 1/(K-1) sum_{j != i} mean_s r_phi(y_s^j)]
              + outcome_coef * [r_o(y^i) - 1/(K-1) sum_{j != i} r_o(y^j)]

    with K the group's kept responses (a group with fewer than 2 gets 0). process_rewards [B, G, T], token_mask
    [B, G, T] bool (response tokens), outcome [B, G], kept [B, G] bool -> [B, G, T], 0 off the mask.
    """
    mask = token_mask & kept[..., None]  # [B, G, T]
    rewards = process_rewards.float().masked_fill(~mask, 0.0)
    means = rewards.sum(dim=2) / mask.sum(dim=2).clamp(min=1)  # [B, G] averaged implicit process reward
    count = kept.sum(dim=1, keepdim=True)  # [B, 1]
    others = (means.masked_fill(~kept, 0.0).sum(dim=1, keepdim=True) - means) / (count - 1).clamp(min=1)  # [B, G]
    shaped = (rewards - others[..., None]).masked_fill(~mask, 0.0)
    batch, group, steps = shaped.shape
    returns = discounted_returns(shaped.view(batch * group, steps), mask.view(batch * group, steps), gamma)
    returns = returns.view(batch, group, steps)  # [B, G, T]
    outcome_advantage = rloo_advantages(outcome.float(), kept)  # [B, G]
    advantages = process_coef * returns + outcome_coef * outcome_advantage[..., None]
    advantages = advantages.masked_fill(~mask | (count < 2)[..., None], 0.0)
    if whiten:
        flat = mask & (count >= 2)[..., None]
        return masked_whiten(advantages.view(batch * group, steps), flat.view(batch * group, steps)).view_as(mask)
    return advantages
