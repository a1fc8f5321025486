"""The reward-model strategies of stage 3 (``reward.strategy``): SAVE, its ablation and every baseline of the paper,
one row each. Every other module asks this table what a strategy does; adding one is a row, its loss function and
its tests (``register_strategy`` adds a row at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from megatron_save.trainers.losses import (
    ROLLOUT_LOSS_OUTPUTS,
    bt_pair_loss,
    hl_bt_rm_loss,
    mean_reward_rm_loss,
    prime_prm_loss,
    save_rm_loss,
)

Anchor = Literal["value_head", "group_mean", "none"]
LearnsFrom = Literal["rollouts", "offline_pairs", "policy_feedback", "nothing"]
UpdateTime = Literal["before_policy", "after_policy", "never"]
RewardSource = Literal["reward_model", "r2m_head", "verifier"]


@dataclass(frozen=True)
class RMStrategy:
    """What one reward-model strategy anchors on, filters, trains, and when."""

    name: str
    """The ``reward.strategy`` value."""
    anchor: Anchor
    """What splits a group into Y+ / Y- (eqs. 13, 15-17): V(x) of the value head, the group's mean reward, or
    nothing (every valid response is kept, there is no partition)."""
    curriculum: bool
    """The curriculum filter mu(t) of eq. 14 applies; otherwise mu = 1/2, which keeps every response."""
    trains_backbone: bool
    """The reward model's backbone and reward head have an optimizer (a run checkpoint and a final model)."""
    value_head: bool
    """Needs a value head in ``reward.checkpoint`` and trains it with eq. 21 beside the reward loss."""
    learns_from: LearnsFrom
    """What the update reads: the step's scored rollouts, the static pairs of ``reward.offline_data``, the policy's
    hidden states (R2M's head), or nothing."""
    update: UpdateTime
    """When the update runs: before the policy update (the batch is then re-scored, Algorithm 2 lines 12-15),
    after it (R2M trains its head on the updated policy's states), or never."""
    rewards: RewardSource = "reward_model"
    """What scores the rollouts: the reward model itself, R2M's head over its and the policy's states, or
    ``reward.verifier``'s grades (the reward model then only serves ``reward.probe_data``)."""
    loss: Callable[..., Any] | None = None
    """The update's loss on one micro-batch, (batch, scores) -> (loss, metrics); None when nothing trains or the
    trained part has its own step (R2M)."""
    loss_metrics: tuple[str, ...] = ()
    """Names of the metrics ``loss`` returns: averaged by the training step, or for a loss on rollouts its
    per-micro-batch scores and sums (ROLLOUT_LOSS_OUTPUTS), gathered by the update."""
    verifier_grades: bool = False
    """The update's batches carry ``reward.verifier``'s grades of the responses, which label its pairs in place of
    the reward model's own scores."""
    implicit_prm: bool = False
    """Trains PRIME's implicit process reward model (a causal LM against its frozen reference) on outcome labels
    instead of the reward model, which stays frozen and only labels; the policy's advantages then combine the
    PRM's token-level rewards with the labels (``reward.prime``)."""

    @property
    def scores_in_update(self) -> bool:
        """The reward model learns from the step's rollouts before the policy, by a loss that partitions on its
        own scores: the update's forward scores the batch too, so the step has no separate scoring forward."""
        return self.learns_from == "rollouts" and self.update == "before_policy" and not self.implicit_prm


STRATEGIES: dict[str, RMStrategy] = {}


def register_strategy(strategy: RMStrategy) -> RMStrategy:
    """Adds a row to the table (refusing a name already taken); returns it."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"reward.strategy {strategy.name!r} is already registered")
    if (strategy.trains_backbone or strategy.implicit_prm) and strategy.loss is None:
        raise ValueError(f"reward.strategy {strategy.name!r} trains a model but has no loss")
    STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_named(name: str) -> RMStrategy:
    """The row of ``name``; refuses an unknown one with the list of names."""
    if name not in STRATEGIES:
        raise ValueError(f"reward.strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


for _row in (
    # SAVE (Algorithm 2): value-anchored softmax contrastive loss (eqs. 18-20) + value loss (eq. 21), curriculum.
    RMStrategy("save", anchor="value_head", curriculum=True, trains_backbone=True, value_head=True,
               learns_from="rollouts", update="before_policy", loss=save_rm_loss,
               loss_metrics=ROLLOUT_LOSS_OUTPUTS),
    # SAVE without the curriculum filter (ablation, paper Table 5).
    RMStrategy("save_no_curriculum", anchor="value_head", curriculum=False, trains_backbone=True, value_head=True,
               learns_from="rollouts", update="before_policy", loss=save_rm_loss,
               loss_metrics=ROLLOUT_LOSS_OUTPUTS),
    # Plain RL against the initial reward model.
    RMStrategy("frozen", anchor="none", curriculum=False, trains_backbone=False, value_head=False,
               learns_from="nothing", update="never"),
    # Continual offline Bradley-Terry on static preference pairs.
    RMStrategy("offline_bt", anchor="none", curriculum=False, trains_backbone=True, value_head=False,
               learns_from="offline_pairs", update="before_policy", loss=bt_pair_loss,
               loss_metrics=("loss", "accuracy")),
    # SAVE's contrastive loss with the group's mean reward as the anchor, no value head.
    RMStrategy("mean_reward", anchor="group_mean", curriculum=True, trains_backbone=True, value_head=False,
               learns_from="rollouts", update="before_policy", loss=mean_reward_rm_loss,
               loss_metrics=ROLLOUT_LOSS_OUTPUTS),
    # Bradley-Terry on each group's highest- vs lowest-reward response.
    RMStrategy("hl_bt", anchor="none", curriculum=False, trains_backbone=True, value_head=False,
               learns_from="rollouts", update="before_policy", loss=hl_bt_rm_loss,
               loss_metrics=ROLLOUT_LOSS_OUTPUTS),
    # PRIME (arXiv 2502.01456): an implicit PRM trained online on outcome labels (from the frozen RM or a
    # verifier); its token-level rewards and the labels' RLOO make the advantages.
    RMStrategy("prime", anchor="none", curriculum=False, trains_backbone=False, value_head=False,
               learns_from="rollouts", update="before_policy", loss=prime_prm_loss,
               loss_metrics=("prm_loss", "prm_accuracy"), implicit_prm=True),
    # R2M (arXiv 2601.22664): the frozen RM's state fused with the policy's; GREBT trains the head after the policy.
    RMStrategy("r2m", anchor="none", curriculum=False, trains_backbone=False, value_head=False,
               learns_from="policy_feedback", update="after_policy", rewards="r2m_head"),
    # HL-BT with each group's pair chosen by a verifier's grades (reward.verifier): the reward model learns the
    # truth's ranking of its own policy's responses. Not a baseline of the paper: where a verifier exists (the gold
    # testbed), the positive control of an online update on the same groups.
    RMStrategy("verifier_hl_bt", anchor="none", curriculum=False, trains_backbone=True, value_head=False,
               learns_from="rollouts", update="before_policy", loss=hl_bt_rm_loss,
               loss_metrics=ROLLOUT_LOSS_OUTPUTS, verifier_grades=True),
    # The policy rewarded by the verifier's grades directly, the reward model frozen and unused for the policy. Not
    # a baseline of the paper: where a task has a verifier (the gold testbed), the oracle, the ceiling of what any
    # reward-model strategy could give the policy with the same RL settings.
    RMStrategy("verifier_reward", anchor="none", curriculum=False, trains_backbone=False, value_head=False,
               learns_from="nothing", update="never", rewards="verifier"),
):
    register_strategy(_row)
