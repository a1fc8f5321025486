"""Stage 1 saves training checkpoints and a resumed run repeats the uninterrupted run's remaining steps."""

from __future__ import annotations

import pytest

from megatron_save.checkpoint.convert import convert_hf_to_megatron
from megatron_save.trainers.stage1_bt import Stage1Config, train_stage1
from megatron_save.trainers.common import BatchSettings, DataSettings
from megatron_save.trainers.optimizer import OptimizerSettings
from megatron_save.testing import save_tiny_hf_model
from megatron_save.testing.synthetic import synthetic_preference_rows, write_jsonl


# bf16: Megatron's mixed-precision optimizer (fp32 main copies) checkpoints and restores the reward model, value
# head included.
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resumed_stage1_matches_uninterrupted(dtype, tmp_path):
    hf_dir = save_tiny_hf_model("qwen2", tmp_path / "hf", reward_model=True, value_head=dtype == "bf16")
    convert_hf_to_megatron(hf_dir, tmp_path / "rm", dtype=dtype)
    data = write_jsonl(synthetic_preference_rows(72, seed=2), tmp_path / "pairs.jsonl")

    def config(output_dir, **changes):
        return Stage1Config(checkpoint=str(tmp_path / "rm"), output_dir=str(tmp_path / output_dir),
                            data=DataSettings(train_data=str(data), eval_fraction=0.12, max_length=96),
                            batch=BatchSettings(global_batch_size=16, micro_batch_size=4),
                            optim=OptimizerSettings(lr=1e-3, warmup_steps=1), **changes)

    straight = train_stage1(config("straight", save_every=2))
    assert (tmp_path / "straight" / "checkpoints" / "step_2" / "train_state.json").exists()
    resumed = train_stage1(config("resumed", resume_from=str(tmp_path / "straight" / "checkpoints" / "step_2")))
    assert [s["step"] for s in resumed["train"]] == [3, 4]
    assert [s["loss"] for s in resumed["train"]] == pytest.approx([s["loss"] for s in straight["train"][2:]],
                                                                   rel=1e-6)
    assert resumed["eval_accuracy"][-1] == straight["eval_accuracy"][-1]
