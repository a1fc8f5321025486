"""Stage 3's hand-offs between rollout, reward model and policy: rollout groups prepared for both models, their
reward-model scores, and the value-anchored partition (Algorithm 2, lines 7-11 and 15)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_save.algorithms import curriculum_threshold, mean_reward_anchor, save_partition
from megatron_save.data.chat import Messages, conversation, encode_conversation, encode_prompt
from megatron_save.data.prompts import Prompt
from megatron_save.models.forward import score_token_sequences
from megatron_save.rollout.engine import Rollouts
from megatron_save.trainers.strategies import RMStrategy


@dataclass
class RolloutGroups:
    """B prompts with G sampled responses each, as policy tokens and as reward-model tokens."""

    prompts: list[Messages]
    """[B] the prompts as chat messages."""
    policy_prompt_ids: list[list[int]]
    """[B] policy token ids of each prompt (with the generation prompt)."""
    policy_response_ids: list[list[list[int]]]
    """[B][G] sampled response token ids (never decoded and re-encoded on the policy side)."""
    rm_prompt_lengths: list[int]
    """[B] reward-model tokens of each prompt with the generation prompt: V(x) is read at the last one."""
    rm_sequences: list[list[list[int]]]
    """[B][G] reward-model token ids of prompt + response (the prompt alone on an invalid slot)."""
    valid: torch.Tensor
    """[B, G] bool: the response is scored and may be trained on."""
    truncated: torch.Tensor
    """[B, G] bool: the response reached max_new_tokens without a stop token."""
    response_lengths: torch.Tensor
    """[B, G] policy tokens of each response."""
    skipped: Counter = field(default_factory=Counter)
    """Responses left invalid, by reason."""
    rollout_logprobs: list[list[list[float]]] | None = None
    """[B][G] the rollout engine's behaviour log-prob of each response token (rollout correction), else None."""

    @property
    def group_size(self) -> int:
        """G."""
        return self.valid.shape[1]


def concat_groups(parts: list[RolloutGroups]) -> RolloutGroups:
    """Several generation batches' groups, in order, as one batch (dynamic sampling)."""
    if len(parts) == 1:
        return parts[0]
    logprobs = [p.rollout_logprobs for p in parts]
    return RolloutGroups(
        prompts=[x for p in parts for x in p.prompts],
        policy_prompt_ids=[x for p in parts for x in p.policy_prompt_ids],
        policy_response_ids=[x for p in parts for x in p.policy_response_ids],
        rm_prompt_lengths=[x for p in parts for x in p.rm_prompt_lengths],
        rm_sequences=[x for p in parts for x in p.rm_sequences],
        valid=torch.cat([p.valid for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        response_lengths=torch.cat([p.response_lengths for p in parts]),
        skipped=sum((p.skipped for p in parts), Counter()),
        rollout_logprobs=None if any(x is None for x in logprobs) else [x for lp in logprobs for x in lp],
    )


@dataclass
class OutcomeFeedback:
    """PRIME's view of a batch: outcome labels, its accuracy filter and the implicit PRM's token rewards."""

    labels: torch.Tensor
    """[B, G] fp32 outcome label of each response in [0, 1] (0 on invalid slots)."""
    prompts_in_range: torch.Tensor
    """[B] bool, prompts whose mean label lies inside the accuracy filter's range."""
    process_rewards: torch.Tensor | None = None
    """[B, G, T] fp32 r_phi(y_t) of the kept responses' tokens (T the longest response; 0 elsewhere); None until
    the PRM phase computed them."""


@dataclass
class GroupScores:
    """Reward-model scores of rollout groups."""

    rewards: torch.Tensor
    """[B, G] fp32 R(x, y); NaN on invalid slots."""
    values: torch.Tensor | None
    """[B] fp32 V(x) (NaN for a prompt without a valid response); None when the RM has no value head."""
    feedback: Any = None
    """R2M: the reward model's and the policy's states the rewards were fused from (its head's update reuses the
    reward model's); None otherwise."""
    outcome: OutcomeFeedback | None = None
    """PRIME: outcome labels of the responses and the PRM's token rewards; None for other strategies."""


@dataclass
class FeedbackPartition:
    """Which responses the curriculum filter keeps and on which side of the anchor they fall (eqs. 13-17)."""

    threshold: float
    """mu(t): keep y iff sigmoid(|R - anchor|) >= mu (1/2 keeps everything)."""
    kept: torch.Tensor
    """[B, G] bool, kept responses (all valid ones for strategies without an anchor)."""
    pos_mask: torch.Tensor
    """[B, G] bool, Y+ (kept, R >= anchor); all False without an anchor."""
    neg_mask: torch.Tensor
    """[B, G] bool, Y- (kept, R < anchor); all False without an anchor."""
    prompt_keep: torch.Tensor
    """[B] bool, B~: prompts with both Y+ and Y- non-empty."""
    anchor: torch.Tensor | None
    """[B] the anchor (V(x), or the group mean for mean_reward); None without one."""


def prepare_groups(rollouts: Rollouts, prompts: list[Prompt], policy_tokenizer: Any, rm_tokenizer: Any,
                   rm_max_length: int, drop_truncated: bool) -> RolloutGroups:
    """Renders each response for the reward model with its own chat template (the policy and the RM may use
    different tokenizers) and marks slots that cannot be scored: empty responses, conversations longer than
    ``rm_max_length``, truncated responses when ``drop_truncated``, and conversations whose rendered prompt is not
    a prefix (V would be read at the wrong token)."""
    skipped: Counter = Counter()
    group_size = len(rollouts.response_ids[0])
    valid = torch.zeros(len(prompts), group_size, dtype=torch.bool)
    rm_sequences, rm_prompt_lengths = [], []
    for i, (prompt, responses) in enumerate(zip(prompts, rollouts.response_ids)):
        rm_prompt = encode_prompt(rm_tokenizer, prompt.messages)
        rm_prompt_lengths.append(len(rm_prompt))
        row = []
        for j, response_ids in enumerate(responses):
            text = policy_tokenizer.decode(response_ids, skip_special_tokens=True)
            sequence = encode_conversation(rm_tokenizer, conversation(prompt.messages, text)) if text.strip() else []
            reason = None
            if not text.strip():
                reason = "empty response"
            elif drop_truncated and rollouts.truncated[i][j]:
                reason = "truncated response"
            elif len(sequence) > rm_max_length:
                reason = f"conversation longer than {rm_max_length} RM tokens"
            elif sequence[: len(rm_prompt)] != rm_prompt:
                reason = "RM prompt tokens not a prefix of the conversation"
            if reason:
                skipped[reason] += 1
                row.append(rm_prompt)
            else:
                valid[i, j] = True
                row.append(sequence)
        rm_sequences.append(row)
    return RolloutGroups(
        prompts=[p.messages for p in prompts],
        policy_prompt_ids=[p.ids for p in prompts],
        policy_response_ids=rollouts.response_ids,
        rm_prompt_lengths=rm_prompt_lengths,
        rm_sequences=rm_sequences,
        valid=valid,
        truncated=torch.tensor(rollouts.truncated, dtype=torch.bool),
        response_lengths=torch.tensor([[len(r) for r in group] for group in rollouts.response_ids]),
        skipped=skipped,
        rollout_logprobs=rollouts.logprobs,
    )


def score_groups(reward_model: Any, groups: RolloutGroups, pad_id: int, micro_batch_size: int,
                 max_tokens: int = 0) -> GroupScores:
    """Collective: R of every valid response and V of every prompt from one forward per sequence (V is read at
    the last prompt token inside each conversation; a group's copies agree, the first is taken); in micro-batches
    of ``micro_batch_size`` sequences, or of at most ``max_tokens`` tokens (reward.max_tokens_per_micro_batch)."""
    index = groups.valid.nonzero().tolist()  # [(b, g)] of valid slots
    rewards = torch.full(groups.valid.shape, float("nan"))
    values = torch.full((groups.valid.shape[0],), float("nan")) if reward_model.has_value_head else None
    if not index:
        return GroupScores(rewards, values)
    sequences = [groups.rm_sequences[b][g] for b, g in index]
    prompt_lengths = [groups.rm_prompt_lengths[b] for b, _ in index] if values is not None else None
    scores = score_token_sequences(reward_model, sequences, pad_id, micro_batch_size, prompt_lengths,
                                   description=None, max_tokens=max_tokens,
                                   budget_setting="reward.max_tokens_per_micro_batch")
    rows, cols = torch.tensor(index).T
    rewards[rows, cols] = scores.rewards
    if values is not None:
        first = {}
        for k, (b, _) in enumerate(index):
            first.setdefault(b, k)
        values[list(first)] = scores.values[list(first.values())]
    return GroupScores(rewards, values)


def non_finite_scores(scores: GroupScores, valid: torch.Tensor) -> int:
    """Count of NaN / inf rewards of valid responses and values of prompts that have one."""
    bad = int((~torch.isfinite(scores.rewards) & valid).sum())
    if scores.values is not None:
        bad += int((~torch.isfinite(scores.values) & valid.any(dim=1)).sum())
    if scores.outcome is not None and scores.outcome.process_rewards is not None:
        bad += int((~torch.isfinite(scores.outcome.process_rewards)).sum())
    return bad


def filter_threshold(strategy: RMStrategy, step: int, total_steps: int, initial_margin: float) -> float:
    """mu(t) of the curriculum (eq. 14) for a strategy that has one; 1/2 (keep everything) for the others."""
    if strategy.curriculum:
        return curriculum_threshold(step, total_steps, initial_margin)
    return 0.5


def partition_feedback(strategy: RMStrategy, scores: GroupScores, valid: torch.Tensor, threshold: float
                       ) -> FeedbackPartition:
    """The anchored filter and partition of the strategy (anchor V(x), or the group's mean reward); a strategy
    without an anchor keeps every valid response, or with outcome labels (PRIME) those of the prompts inside its
    accuracy filter's range (then B~)."""
    if strategy.anchor == "none":
        none = torch.zeros_like(valid)
        if scores.outcome is None:
            return FeedbackPartition(threshold, valid.clone(), none, none.clone(), none.any(dim=1), None)
        prompt_keep = scores.outcome.prompts_in_range & valid.any(dim=1)
        return FeedbackPartition(threshold, valid & prompt_keep[:, None], none, none.clone(), prompt_keep, None)
    if strategy.anchor == "group_mean":
        anchor = mean_reward_anchor(scores.rewards.nan_to_num(0.0), valid)
    else:
        if scores.values is None:
            raise ValueError(f"reward.strategy={strategy.name} needs a reward model with a value head (stage 2 "
                             "output)")
        anchor = scores.values
    pos, neg, prompt_keep = save_partition(scores.rewards, anchor, valid, threshold)
    return FeedbackPartition(threshold, pos | neg, pos, neg, prompt_keep, anchor)


def rm_trained(groups: RolloutGroups, skip_truncated: bool) -> torch.Tensor:
    """[B, G] bool, the valid responses the reward model (or PRIME's PRM) learns from: all of them, or, with
    ``skip_truncated``, those not cut at max_new_tokens (the paper's RM update leaves out responses over its
    generation limit; the policy still trains on them)."""
    return groups.valid & ~groups.truncated if skip_truncated else groups.valid
