"""What vLLM's CPU platform cannot do is refused before any engine starts, naming the setting: sleep mode, a KV
cache sized by gpu_memory_utilization (a share of host memory on CPU), and an attention head size the CPU backend
does not run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from megatron_save.rollout import SamplingSettings, VLLMRolloutEngine, VLLMSettings
from megatron_save.rollout.vllm_engine import check_head_dim, check_vllm_settings, vllm_platform
from megatron_save.testing import save_tiny_hf_model
from megatron_save.trainers.stage3 import Stage3Config, check_stage3_config

pytestmark = pytest.mark.vllm

RUNNABLE = VLLMSettings(kv_cache_memory_gib=0.125, sleep_between_rollouts=False)


@pytest.fixture
def under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_cpu_platform_refuses_sleep_mode_and_an_unsized_kv_cache(under_torchrun):
    assert vllm_platform().is_cpu()
    sampling = SamplingSettings()
    with pytest.raises(ValueError, match=r"rollout.vllm.sleep_between_rollouts=true: vLLM has no sleep mode .*cpu"):
        check_vllm_settings(VLLMSettings(kv_cache_memory_gib=1.0), sampling, 1)
    with pytest.raises(ValueError, match="rollout.vllm.kv_cache_memory_gib is unset"):
        check_vllm_settings(VLLMSettings(sleep_between_rollouts=False), sampling, 1)
    check_vllm_settings(RUNNABLE, sampling, 1)
    # The stage-3 config check asks the same, before any model is built.
    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.rollout.backend = "vllm"
    with pytest.raises(ValueError, match="rollout.vllm.sleep_between_rollouts=true"):
        check_stage3_config(cfg)
    cfg.rollout.vllm.sleep_between_rollouts = False
    with pytest.raises(ValueError, match="rollout.vllm.kv_cache_memory_gib is unset"):
        check_stage3_config(cfg)


def test_cpu_platform_refuses_a_head_size_its_attention_does_not_run(tmp_path):
    platform = vllm_platform()
    small = save_tiny_hf_model("llama", tmp_path / "head_dim_16")  # hidden 64 over 4 heads
    with pytest.raises(ValueError, match=r"rollout.backend=vllm: the policy's head_dim=16 .*head_dim_16/config.json"):
        VLLMRolloutEngine(small, RUNNABLE, torch.float32, max_model_len=64, max_batch_size=2, seed=0)
    qwen3 = save_tiny_hf_model("qwen3", tmp_path / "qwen3")  # head_dim 24 set apart from hidden / heads
    with pytest.raises(ValueError, match="head_dim=24"):
        check_head_dim(AutoConfig.from_pretrained(qwen3), torch.float32, qwen3, platform)
    runnable = save_tiny_hf_model("qwen3", tmp_path / "qwen3_32", head_dim=32)
    check_head_dim(AutoConfig.from_pretrained(runnable), torch.float32, runnable, platform)
