"""Stage 3: RL with an online reward model (SAVE, paper Algorithm 2) and every baseline, one package.

Where things live: ``loop`` the run and the step (read it first), ``run`` setup and final models, ``config`` the
settings, ``rollout_phase`` sampling and scoring, ``reward_phase`` the reward model's updates, ``policy_phase`` the
policy's, ``batches`` their pure batch building, ``groups`` the hand-offs between phases, ``r2m`` the R2M
baseline's head, ``metrics`` what a step reports. What each strategy does is one row of
``megatron_save.trainers.strategies``.
"""

from megatron_save.trainers.stage3.config import Stage3Config, check_stage3_config
from megatron_save.trainers.stage3.loop import main, train_stage3

__all__ = ["Stage3Config", "check_stage3_config", "main", "train_stage3"]
