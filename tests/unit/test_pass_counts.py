"""A SAVE step against a GRPO step (frozen RM) on CPU, its forwards and backwards counted by hooks on the models
(tests/pass_counts.py, which the GPU tier's tests/gpu/test_gpu_save_cost.py runs on a GPU too)."""

from __future__ import annotations

from pass_counts import check_save_against_grpo, hooked_stage3_step


def test_a_save_step_adds_one_reward_backward_and_the_rescore_by_hooks(tiny_models, rl_data, tmp_path, world_of_one):
    steps = {strategy: hooked_stage3_step(tmp_path / strategy, tiny_models["llama-lm"]["mg"],
                                          tiny_models["llama-rmv"]["mg"], rl_data["prompts"],
                                          f"reward.strategy={strategy}", "parallel.tensor_model_parallel_size=1")
             for strategy in ("frozen", "save")}
    check_save_against_grpo(steps["frozen"], steps["save"])
