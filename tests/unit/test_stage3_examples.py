"""Every stage-3 example config, alone or with its overlays, loads into the schema and passes the checks."""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO

from megatron_save.config import load_config
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config

EXAMPLES = REPO / "examples"
COMBINATIONS = [
    ["cpu/stage3_save.yaml"],
    ["paper/stage3_save.yaml"],
    *[["paper/stage3_save.yaml", f"algorithms/{p.name}"] for p in sorted((EXAMPLES / "algorithms").glob("*.yaml"))],
    ["paper/stage3_save.yaml", "scaling/stage3_8b.yaml"],
    ["paper/stage3_save.yaml", "scaling/stage3_70b.yaml"],
    ["paper/stage3_save.yaml", "scaling/stage3_qwen3_30b_a3b.yaml"],
    ["paper/stage3_save.yaml", "scaling/stage3_qwen3_235b_a22b.yaml"],
    ["paper/stage3_save.yaml", "scaling/stage3_4b.yaml"],
]


@pytest.fixture
def gpu_extras(monkeypatch):
    """Checks configs as on a GPU machine with Transformer Engine or Apex (the paper's distributed optimizer)."""
    monkeypatch.setattr("megatron_save.trainers.stage3.config.distributed_optimizer_state_supported", lambda: True)


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join(files))
def test_example_loads(files, gpu_extras):
    cfg = load_config(Stage3Config, [EXAMPLES / f for f in files])
    check_stage3_config(cfg)
    assert cfg.policy.checkpoint and cfg.reward.checkpoint


def test_overlays_override_in_order():
    cfg = load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml", EXAMPLES / "algorithms/gspo.yaml"],
                      ["policy.clip_high=0.001"])
    assert (cfg.policy.loss, cfg.policy.clip_low, cfg.policy.clip_high) == ("gspo", 3e-4, 0.001)
    assert cfg.rollout.sampling.n == 16 and cfg.total_steps == 320  # Table 8 kept


def test_distributed_optimizer_checkpoints_refused_without_the_gpu_extras(monkeypatch):
    """megatron-core 0.16.1 with torch's AdamW asserts when it saves a distributed optimizer whose parameters took
    uneven steps (stage 3's skipped and value-only RM updates): the config check says so before any model."""
    monkeypatch.setattr("megatron_save.trainers.stage3.config.distributed_optimizer_state_supported", lambda: False)
    cfg = load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml"])
    with pytest.raises(ValueError, match=r"policy.optim.use_distributed_optimizer=true with run checkpoints"):
        check_stage3_config(cfg)
    cfg = load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml"], ["policy.optim.use_distributed_optimizer=false"])
    with pytest.raises(ValueError, match=r"reward.optim.use_distributed_optimizer=true"):
        check_stage3_config(cfg)
    check_stage3_config(load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml"],
                                    ["save_every=0", "save_final_checkpoint=false"]))
    # Only optimizers that exist count: a frozen RM (GRPO) has none.
    check_stage3_config(load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml"],
                                    ["policy.optim.use_distributed_optimizer=false", "reward.strategy=frozen",
                                     "reward.update_skips_truncated=false"]))


def test_vllm_overlay_loads_and_is_refused_without_vllm(gpu_extras):
    cfg = load_config(Stage3Config, [EXAMPLES / "paper/stage3_save.yaml", EXAMPLES / "rollout/vllm.yaml"])
    assert (cfg.rollout.backend, cfg.rollout.vllm.tensor_parallel_size) == ("vllm", 2)
    assert cfg.offload.optimizer and cfg.offload.gradients and cfg.offload.reference
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
            check_stage3_config(cfg)
