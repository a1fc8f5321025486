"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards", arXiv 2502.01456): token-level
implicit process rewards of a causal LM against its frozen reference (eq. 3), the cross-entropy update of that
implicit PRM on outcome labels (eq. 4), its accuracy filter (section 3.3), and the advantages that combine the
process rewards' returns with a leave-one-out baseline and the outcome rewards' RLOO (eq. 5, in the form of PRIME's
released code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_save.algorithms.advantages import discounted_returns, masked_whiten

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


def leave_one_out_token_rewards(token_rewards: torch.Tensor, reward_mask: torch.Tensor, kept: torch.Tensor
                                ) -> torch.Tensor:
    """PRIME's released leave-one-out baseline on one reward source (its code, not eq. 5 as printed):

        r_t^i -> r_t^i * K / (K - 1) - (sum_{j in group} mean_s r_s^j) / (K - 1)

    where mean_s runs over the source's reward positions of response j and K counts the group's kept responses.
    For a single reward per response (an outcome on its last token) this is RLOO, r^i - mean_{j != i} r^j; for
    token rewards it differs from subtracting the other responses' mean, r_t^i - mean_{j != i} mean_s r_s^j,
    by (r_t^i - mean_s r_s^i) / (K - 1). token_rewards [B, G, T], reward_mask [B, G, T] bool, kept [B, G] bool ->
    [B, G, T], 0 off the kept responses' reward positions and in groups with fewer than 2 kept.
    """
    mask = reward_mask & kept[..., None]  # [B, G, T]
    rewards = token_rewards.float().masked_fill(~mask, 0.0)
    means = rewards.sum(dim=2) / mask.sum(dim=2).clamp(min=1)  # [B, G]
    count = kept.sum(dim=1, keepdim=True)  # [B, 1]
    total = means.masked_fill(~kept, 0.0).sum(dim=1, keepdim=True)  # [B, 1]
    shaped = (rewards * count[..., None] - total[..., None]) / (count - 1).clamp(min=1)[..., None]
    return shaped.masked_fill(~mask | (count < 2)[..., None], 0.0)


def last_tokens(token_mask: torch.Tensor) -> torch.Tensor:
    """[..., T] bool: the last True position of each contiguous run of ``token_mask`` (a response's last token)."""
    following = torch.zeros_like(token_mask)
    following[..., :-1] = token_mask[..., 1:]
    return token_mask & ~following


def prime_advantages(process_rewards: torch.Tensor, token_mask: torch.Tensor, outcome: torch.Tensor,
                     kept: torch.Tensor, process_coef: float, outcome_coef: float, gamma: float = 1.0,
                     whiten: bool = True) -> torch.Tensor:
    """PRIME's advantages as its released code computes them (PRIME-RL/PRIME, training/verl/trainer/ppo/
    core_algos.py, ``compute_rloo_returns``; the same formula as ``masked_rloo`` in verl's recipe/prime/
    prime_core_algos.py): each source through ``leave_one_out_token_rewards`` (the process rewards on every
    response token, the outcome label on the last one), weighted, summed, the discounted return-to-go of the sum,
    optionally whitened over the batch's response tokens (unbiased variance, as the released ``masked_whiten``):

        A_t^i = sum_{s >= t} gamma^(s - t) [process_coef * (r_phi(y_s^i) K - sum_j mean_u r_phi(y_u^j)) / (K - 1)
                                            + outcome_coef * 1[s last] (r_o(y^i) K - sum_j r_o(y^j)) / (K - 1)]

    The paper's eq. 5 as printed subtracts the other responses' mean instead, which differs on the process term by
    (r_phi(y_t^i) - mean_u r_phi(y_u^i)) / (K - 1); the released form is the one PRIME's results come from. K is
    the group's kept responses (a group with fewer than 2 gets 0). process_rewards [B, G, T], token_mask [B, G, T]
    bool (each response's tokens, a prefix), outcome [B, G], kept [B, G] bool -> [B, G, T], 0 off the mask.
    """
    mask = token_mask & kept[..., None]  # [B, G, T]
    last = last_tokens(mask)  # [B, G, T] the outcome's position
    process = leave_one_out_token_rewards(process_rewards, mask, kept)
    outcome_rewards = leave_one_out_token_rewards(outcome.float()[..., None].expand_as(last), last, kept)
    batch, group, steps = mask.shape
    token_rewards = (process_coef * process + outcome_coef * outcome_rewards).view(batch * group, steps)
    advantages = discounted_returns(token_rewards, mask.view(batch * group, steps), gamma).view(batch, group, steps)
    in_groups = mask & (kept.sum(dim=1) >= 2)[:, None, None]
    advantages = advantages.masked_fill(~in_groups, 0.0)
    if whiten:
        return masked_whiten(advantages.view(batch * group, steps), in_groups.view(batch * group, steps)).view_as(mask)
    return advantages
