"""The R2M baseline in stage 3 (its Algorithm 1): rewards from the frozen reward model's state at its reward
position fused with the policy's hidden states (R2MHead), and the lightweight GREBT update of that head after each
policy update on the updated policy's states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_save.algorithms import grebt_loss
from megatron_save.distributed import compute_device
from megatron_save.models.forward import broadcast_from_last_stage, final_hidden_states, last_token_index
from megatron_save.models.r2m import R2MHead
from megatron_save.models.reward_model import reward_positions
from megatron_save.models.train_state import TrainState
from megatron_save.trainers.stage3.groups import GroupScores, RolloutGroups
from megatron_save.utils.tensors import pad_rows


@dataclass
class PolicyFeedback:
    """What R2M scores a batch's valid responses from."""

    slots: list[tuple[int, int]]
    """(prompt, response) index of each row."""
    reward_states: torch.Tensor
    """[N, Dm] the frozen reward model's last-layer state where it reads each conversation's reward."""
    policy_hidden: torch.Tensor | None
    """[N, S, Dp] the policy's last-layer hidden states over prompt + response (all but the last token); None only
    while they are recomputed after the policy update."""
    policy_mask: torch.Tensor
    """[N, S] bool, real positions of policy_hidden."""


def _hidden_of(model: Any, sequences: list[list[int]], pad_id: int, micro_batch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states [N, S, H], the padded token ids [N, S] and the padding mask [N, S] of token sequences
    (filled up to whole micro-batches with copies of the first row, dropped afterwards)."""
    rows = sequences + [sequences[0]] * (-len(sequences) % micro_batch_size)
    input_ids, mask = pad_rows(rows, pad_id)
    hidden = final_hidden_states(model, input_ids, micro_batch_size)
    return hidden[: len(sequences)], input_ids[: len(sequences)], mask[: len(sequences)]


def policy_hidden_states(policy: Any, groups: RolloutGroups, slots: list[tuple[int, int]], pad_id: int,
                         micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's hidden states at positions 0 .. S - 2 of each slot's prompt + response: [N, S, Dp], mask."""
    sequences = [groups.policy_prompt_ids[b] + groups.policy_response_ids[b][g] for b, g in slots]
    hidden, _, mask = _hidden_of(policy, sequences, pad_id, micro_batch_size)
    mask[torch.arange(len(sequences)), last_token_index(mask)] = False  # the last token predicts nothing
    return hidden, mask


def reward_states(reward_model: Any, sequences: list[list[int]], pad_id: int, micro_batch_size: int
                  ) -> torch.Tensor:
    """[N, Dm] the reward model's last-layer state where it reads each sequence's reward: the last token that is
    not its pad token, as transformers reads it (``reward_positions``; with pad = EOS, before a trailing EOS)."""
    hidden, input_ids, mask = _hidden_of(reward_model, sequences, pad_id, micro_batch_size)  # [N, S, Dm]
    rows = torch.arange(len(sequences))
    read_at = reward_positions(input_ids, reward_model.pad_token_id)[rows, last_token_index(mask)]  # [N]
    return hidden[rows, read_at.to(hidden.device)]


def collect_feedback(reward_model: Any, policy: Any, groups: RolloutGroups, rm_pad: int, policy_pad: int,
                     micro_batch_size: int) -> PolicyFeedback:
    """Collective: the reward model's states (at its reward positions) and the policy's hidden states of every
    valid slot."""
    slots = [tuple(s) for s in groups.valid.nonzero().tolist()]
    states = reward_states(reward_model, [groups.rm_sequences[b][g] for b, g in slots], rm_pad, micro_batch_size)
    policy_hidden, policy_mask = policy_hidden_states(policy, groups, slots, policy_pad, micro_batch_size)
    return PolicyFeedback(slots, states, policy_hidden, policy_mask)


def build_r2m_head(reward_model: Any, policy: Any, width: int, seed: int) -> R2MHead:
    """A fresh head whose reward projection starts as the reward model's reward head (shared by every stage)."""
    weight = reward_model.output_layer.reward_head.weight.detach().float() if reward_model.post_process else None
    weight = broadcast_from_last_stage(weight, (1, reward_model.config.hidden_size), torch.float32)
    head = R2MHead(reward_model.config, reward_model.config.hidden_size, policy.config.hidden_size, width, weight,
                   seed)
    return head.to(compute_device())


def r2m_rewards(head: Any, feedback: PolicyFeedback, omega: float, shape: torch.Size) -> torch.Tensor:
    """[B, G] R2M rewards of the valid slots (NaN elsewhere); no gradient."""
    rewards = torch.full(shape, float("nan"))
    if feedback.slots:
        with torch.no_grad():
            device = compute_device()
            values = head(feedback.reward_states.to(device), feedback.policy_hidden.to(device),
                          feedback.policy_mask.to(device), omega)
        rows, cols = torch.tensor(feedback.slots).T
        rewards[rows, cols] = values.float().cpu()
    return rewards


def update_r2m_head(state: TrainState, feedback: PolicyFeedback, valid: torch.Tensor, omega: float,
                    alpha: float) -> dict[str, float]:
    """One optimizer step of GREBT (eq. 7) over every group. Each rank computes the whole (small) loss on the same
    data; Megatron DDP's average of identical gradients leaves them unchanged."""
    state.model.train()
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    device = compute_device()
    values = state.model(feedback.reward_states.to(device), feedback.policy_hidden.to(device),
                         feedback.policy_mask.to(device), omega)  # [N]
    rows, cols = torch.tensor(feedback.slots).T
    rewards = torch.zeros(valid.shape, device=device).index_put((rows.to(device), cols.to(device)), values)
    loss = grebt_loss(rewards, valid.to(device), alpha)
    loss.backward()
    state.model.finish_grad_sync()
    updated, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(1)
    return {"rm/grebt_loss": loss.item(), "rm/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "rm/update_skipped": float(not updated)}


def score_with_r2m(state: TrainState, reward_model: Any, policy: Any, groups: RolloutGroups, omega: float, rm_pad: int,
                   policy_pad: int, micro_batch_size: int) -> GroupScores | None:
    """Collective: R2M's rewards of the valid responses, carrying the states they came from (the head's update
    reuses the reward model's); None when no response is valid (there is nothing to fuse)."""
    if not groups.valid.any():
        return None
    feedback = collect_feedback(reward_model, policy, groups, rm_pad, policy_pad, micro_batch_size)
    return GroupScores(r2m_rewards(state.module, feedback, omega, groups.valid.shape), None, feedback)


def update_r2m_after_policy(state: TrainState, policy: Any, groups: RolloutGroups, feedback: PolicyFeedback,
                            omega: float, alpha: float, policy_pad: int, micro_batch_size: int) -> dict[str, float]:
    """Collective: GREBT on the updated policy's hidden states of the step's responses."""
    feedback.policy_hidden = None  # the old states go before the new ones are gathered, not after
    feedback.policy_hidden, feedback.policy_mask = policy_hidden_states(policy, groups, feedback.slots, policy_pad,
                                                                        micro_batch_size)
    return update_r2m_head(state, feedback, groups.valid, omega, alpha)
