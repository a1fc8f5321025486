"""Stage 3's pieces: preparing rollout groups, the strategies' partitions, advantages per token, the policy
batch's loss scaling, prompt order, run checkpoints and metrics files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from megatron_save.algorithms import (
    grpo_advantages,
    gspo_policy_loss,
    ppo_clip_policy_loss,
    reinforce_pp_advantages,
    save_partition,
)
from megatron_save.checkpoint.run_checkpoint import check_run_settings, latest_checkpoint, settings_changes
from megatron_save.data.chat import conversation, encode_conversation, encode_prompt
from megatron_save.data.prompts import Prompt, load_prompts
from megatron_save.rollout import Rollouts
from megatron_save.testing import tiny_tokenizer
from megatron_save.testing.synthetic import write_jsonl
from megatron_save.algorithms import token_advantages
from megatron_save.trainers.stage3.batches import PolicyRows
from megatron_save.trainers.stage3.config import PolicySettings, Stage3Config, check_stage3_config
from megatron_save.trainers.stage3.groups import (
    GroupScores,
    filter_threshold,
    non_finite_scores,
    partition_feedback,
    prepare_groups,
    rm_trained,
)
from megatron_save.trainers.stage3.policy_phase import policy_loss, policy_mini_batches
from megatron_save.trainers.stage3.reward_phase import offline_pair_indices
from megatron_save.trainers.stage3.rollout_phase import prompt_batch
from megatron_save.trainers.strategies import STRATEGIES
from megatron_save.utils.metrics import MetricsWriter, truncate_history


def _prompt(tokenizer, text: str) -> Prompt:
    messages = [{"role": "user", "content": text}]
    return Prompt(messages, encode_prompt(tokenizer, messages))


def test_prepare_groups_marks_and_counts_unusable_responses():
    tokenizer = tiny_tokenizer()
    prompts = [_prompt(tokenizer, "hi"), _prompt(tokenizer, "yo")]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    rollouts = Rollouts(
        prompt_ids=[p.ids for p in prompts],
        response_ids=[[encode("ok") + [eos], [eos]], [encode("cut off"), encode("x" * 60) + [eos]]],
        truncated=[[False, False], [True, False]],
    )
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=40, drop_truncated=True)
    assert groups.valid.tolist() == [[True, False], [False, False]]
    assert groups.skipped == {"empty response": 1, "truncated response": 1,
                              "conversation longer than 40 RM tokens": 1}
    assert groups.rm_sequences[0][0] == encode_conversation(tokenizer, conversation(prompts[0].messages, "ok"))
    assert groups.rm_sequences[0][1] == encode_prompt(tokenizer, prompts[0].messages)  # invalid slot: the prompt
    assert groups.rm_prompt_lengths[0] == len(prompts[0].ids)
    assert groups.response_lengths.tolist() == [[3, 1], [7, 61]]

    kept = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=40, drop_truncated=False)
    assert kept.valid.tolist() == [[True, False], [True, False]]


def test_partition_by_strategy():
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.5, float("nan")]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    scores = GroupScores(rewards, torch.tensor([2.5, 0.25]))
    save = partition_feedback(STRATEGIES["save"], scores, valid, 0.5)
    expected = save_partition(rewards, scores.values, valid, 0.5)
    assert torch.equal(save.pos_mask, expected[0]) and torch.equal(save.neg_mask, expected[1])
    assert save.prompt_keep.tolist() == [True, True]
    # mean_reward anchors on the group mean: 2.0 and 0.25.
    mean = partition_feedback(STRATEGIES["mean_reward"], scores, valid, 0.5)
    assert mean.anchor.tolist() == [2.0, 0.25]
    assert mean.pos_mask.tolist() == [[False, True, True], [False, True, False]]
    for strategy in ("frozen", "hl_bt", "offline_bt"):
        plain = partition_feedback(STRATEGIES[strategy], scores, valid, 0.5)
        assert torch.equal(plain.kept, valid) and not plain.prompt_keep.any() and plain.anchor is None
    with pytest.raises(ValueError, match="value head"):
        partition_feedback(STRATEGIES["save"], GroupScores(rewards, None), valid, 0.5)


def test_rm_update_can_leave_truncated_responses_out():
    tokenizer = tiny_tokenizer()
    prompts = [_prompt(tokenizer, "hi"), _prompt(tokenizer, "yo")]
    eos = tokenizer.eos_token_id
    rollouts = Rollouts(prompt_ids=[p.ids for p in prompts], response_ids=[[[5, eos], [6, 7], [8, eos]]] * 2,
                        truncated=[[False, True, False], [True, True, False]])
    groups = prepare_groups(rollouts, prompts, tokenizer, tokenizer, rm_max_length=64, drop_truncated=False)
    assert rm_trained(groups, skip_truncated=False).tolist() == groups.valid.tolist()
    assert rm_trained(groups, skip_truncated=True).tolist() == [[True, False, True], [False, False, True]]
    assert groups.valid.all()  # the step's own groups (the policy's) keep every response


def test_filter_threshold_and_non_finite_counts():
    assert filter_threshold(STRATEGIES["save"], 1, 10, 0.5) == pytest.approx((2 - 0.6) / 2)
    assert filter_threshold(STRATEGIES["mean_reward"], 1, 10, 0.5) == pytest.approx((2 - 0.6) / 2)
    assert filter_threshold(STRATEGIES["save_no_curriculum"], 1, 10, 0.5) == 0.5
    assert filter_threshold(STRATEGIES["hl_bt"], 1, 10, 0.5) == 0.5
    valid = torch.tensor([[True, False], [False, False]])
    rewards = torch.tensor([[float("inf"), float("nan")], [float("nan"), float("nan")]])
    assert non_finite_scores(GroupScores(rewards, torch.tensor([1.0, float("nan")])), valid) == 1
    assert non_finite_scores(GroupScores(rewards, torch.tensor([float("nan"), 1.0])), valid) == 2


def test_token_advantages_follow_the_algorithms():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.0, 1.0, float("nan")]])
    kept = torch.tensor([[True, True, True], [True, True, False]])
    lengths = torch.tensor([[2, 3, 1], [1, 2, 4]])
    grpo = token_advantages("grpo", rewards, kept, lengths)  # [2, 3, 4]
    per_response = grpo_advantages(rewards.nan_to_num(0.0), kept)
    assert grpo.shape == (2, 3, 4)
    assert torch.allclose(grpo[0, 1, :3], per_response[0, 1].expand(3)) and grpo[0, 1, 3] == 0
    assert grpo[1, 2].abs().sum() == 0  # not kept
    reinforce = token_advantages("reinforce_pp", rewards, kept, lengths)
    mask = (torch.arange(4) < lengths[..., None]) & kept[..., None]
    last = (torch.arange(4) == lengths[..., None] - 1) & mask
    direct = reinforce_pp_advantages((rewards.nan_to_num(0.0)[..., None] * last).flatten(0, 1), mask.flatten(0, 1))
    assert torch.allclose(reinforce.flatten(0, 1), direct)
    with pytest.raises(ValueError, match="unknown advantage"):
        token_advantages("ppo", rewards, kept, lengths)


def _rows() -> PolicyRows:
    generator = torch.Generator().manual_seed(0)
    sequences, prompt_lengths, advantages = [], [], []
    for prompt, response in ((3, 4), (5, 2), (2, 6), (4, 1), (3, 3)):
        sequences.append(torch.randint(3, 100, (prompt + response,), generator=generator).tolist())
        prompt_lengths.append(prompt)
        advantages.append(torch.randn(response, generator=generator))
    return PolicyRows(sequences, prompt_lengths, advantages)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "gspo"])
def test_policy_micro_batch_losses_add_up_to_the_whole_batch_loss(aggregation, tiny_models, world_of_one):
    """Megatron's mean of the micro-batch losses is the whole batch's loss; for GSPO, with each response's
    advantage read from its own tokens (the batch's advantage rows are zero on prompt positions)."""
    from megatron_save.checkpoint import build_model_from_checkpoint

    policy, _, _ = build_model_from_checkpoint(tiny_models["llama-lm"]["mg"])
    loss_kind = "gspo" if aggregation == "gspo" else "ppo_clip"
    settings = PolicySettings(checkpoint="unused", micro_batch_size=2, mini_batches=1, kl_coef=0.1,
                              aggregation="token-mean" if loss_kind == "gspo" else aggregation, loss=loss_kind,
                              clip_low=0.2, clip_high=0.2)
    rows = _rows()
    temperature = 0.7  # log-probs of the sampling distribution softmax(logits / 0.7)
    (micro_batches,), metrics, _ = policy_mini_batches(policy, policy, rows, settings, pad_id=0,
                                                    temperature=temperature)
    assert len(micro_batches) == 3  # 5 rows + 1 filler in micro-batches of 2
    # One optimizer step: the old log-probs (and pre-update metrics) come from the update's own forward.
    assert metrics == {} and all(batch.old_logp is None for batch in micro_batches)
    for batch, (sequence, prompt) in zip([b for m in micro_batches for b in m.split(1)],
                                         zip(rows.sequences, rows.prompt_lengths)):
        assert batch.loss_mask.sum() == len(sequence) - prompt
        assert batch.loss_mask[0, prompt - 1] and not batch.loss_mask[0, prompt - 2]

    # Shifted "new" log-probs: logits of the old policy plus noise.
    generator = torch.Generator().manual_seed(1)
    losses, all_logp, all_batches = [], [], []
    next_token_logp = lambda logits, ids: torch.log_softmax(logits[:, :-1] / temperature, -1).gather(  # noqa: E731
        -1, ids[:, 1:, None])[..., 0]
    for batch in micro_batches:
        with torch.no_grad():
            logits = policy(batch.input_ids, batch.position_ids(), None)
        batch = dataclasses.replace(batch, old_logp=next_token_logp(logits, batch.input_ids))
        logits = logits + 0.3 * torch.randn(logits.shape, generator=generator)
        loss, _ = policy_loss(settings, 1.0, temperature, batch, logits)
        losses.append(loss)
        logp = next_token_logp(logits, batch.input_ids)
        all_logp.append(logp)
        all_batches.append(batch)
    # Megatron averages the micro-batch losses: that must be the loss of the whole batch at once.
    megatron_loss = torch.stack(losses).mean()
    cat = lambda name: torch.cat([getattr(b, name) for b in all_batches])  # noqa: E731
    logp, mask = torch.cat(all_logp), cat("loss_mask")
    kl_tokens = torch.exp(cat("ref_logp") - logp) - (cat("ref_logp") - logp) - 1
    real = mask.any(dim=1)  # the filler row is no sequence of the batch
    if aggregation == "token-mean":
        whole = ppo_clip_policy_loss(logp, cat("old_logp"), cat("advantages"), mask, 0.2, 0.2)
        expected = whole.loss + 0.1 * kl_tokens[mask].mean()
    else:
        per_sequence = lambda t: (t * mask).sum(1)[real] / mask.sum(1)[real]  # noqa: E731
        if loss_kind == "gspo":
            surrogate = gspo_policy_loss(logp[real], cat("old_logp")[real], per_sequence(cat("advantages")),
                                         mask[real], 0.2, 0.2).loss
            assert abs(surrogate.item()) > 1e-3  # the advantages reach the loss
        else:
            surrogate = ppo_clip_policy_loss(logp[real], cat("old_logp")[real], cat("advantages")[real],
                                             mask[real], 0.2, 0.2, aggregation=aggregation).loss
        expected = surrogate + 0.1 * per_sequence(kl_tokens).mean()
    assert megatron_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_prompt_batches_are_a_function_of_the_step():
    prompts = [Prompt([], [i]) for i in range(10)]
    first_epoch = [prompt_batch(prompts, 4, step, seed=3) for step in (1, 2)]
    assert sorted(p.ids[0] for batch in first_epoch for p in batch) == sorted(
        {p.ids[0] for batch in first_epoch for p in batch})  # no repeats within an epoch
    assert prompt_batch(prompts, 4, 2, seed=3) == first_epoch[1]
    assert prompt_batch(prompts, 4, 3, seed=3) != first_epoch[0]  # a new epoch reshuffles
    assert offline_pair_indices([5] * 20, 8, 3, seed=1) == offline_pair_indices([5] * 20, 8, 3, seed=1)
    with pytest.raises(ValueError, match="fewer than offline_batch_size"):
        offline_pair_indices([5] * 4, 8, 1, seed=1)


def test_load_prompts_counts_skips_and_names_bad_rows(tmp_path):
    tokenizer = tiny_tokenizer()
    path = write_jsonl([{"prompt": "hello"}, {"prompt": " "}, {"prompt": "x" * 100}], tmp_path / "p.jsonl")
    prompts, report = load_prompts(str(path), tokenizer, max_prompt_length=50)
    assert [p.messages[0]["content"] for p in prompts] == ["hello"]
    assert report.skipped == {"empty prompt": 1, "prompt longer than 50 tokens": 1}
    bad = write_jsonl([{"prompt": "a"}, {"prompt": None}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="row 1"):
        load_prompts(str(bad), tokenizer, 50)


def test_config_refusals_name_the_setting():
    for override, message in ((dict(total_steps=0), "total_steps=0"),):
        with pytest.raises(ValueError, match=message):
            check_stage3_config(Stage3Config(output_dir="o", train_data="d", **override))
    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.reward.strategy = "offline_bt"
    with pytest.raises(ValueError, match="reward.offline_data"):
        check_stage3_config(cfg)
    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.policy.loss = "dpo"
    with pytest.raises(ValueError, match="policy.loss='dpo'"):
        check_stage3_config(cfg)
    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.rollout.backend = "vllm"
    if importlib.util.find_spec("vllm") is None:  # the vLLM tier tests the refusals of vLLM's platforms
        with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
            check_stage3_config(cfg)


def test_resume_settings_survive_json_and_name_what_changed(tmp_path):
    from dataclasses import asdict

    from megatron_save.trainers.stage3.config import RESUMABLE_CHANGES

    cfg = Stage3Config(output_dir="o", train_data="d")
    cfg.policy.checkpoint = cfg.reward.checkpoint = "c"
    saved = json.loads(json.dumps(asdict(cfg)))  # as run_state.json keeps them: lr 1e-07, lists, None
    assert settings_changes(saved, asdict(cfg), RESUMABLE_CHANGES) == []
    cfg.policy.kl_coef, cfg.rollout.sampling.stop_token_ids = 0.02, [7]
    cfg.offload.optimizer, cfg.exit_after_steps, cfg.output_dir = True, 3, "moved"  # may change
    assert settings_changes(saved, asdict(cfg), RESUMABLE_CHANGES) == [
        "policy.kl_coef: 0.04 -> 0.02", "rollout.sampling.stop_token_ids: [] -> [7]"]
    assert settings_changes({"a": 1, "old": 2}, {"a": 1, "new": 3}, ()) == []  # another version's settings
    assert settings_changes({"offloaded": 1}, {"offloaded": 2}, ("offload",)) == ["offloaded: 1 -> 2"]
    (tmp_path / "run_state.json").write_text(json.dumps({"step": 1, "settings": saved}))
    with pytest.raises(ValueError, match=r"other settings.*policy\.kl_coef: 0\.04 -> 0\.02"):
        check_run_settings(tmp_path, asdict(cfg), RESUMABLE_CHANGES)
    (tmp_path / "run_state.json").write_text(json.dumps({"step": 1}))  # an older checkpoint: not checked
    check_run_settings(tmp_path, asdict(cfg), RESUMABLE_CHANGES)


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path, world_of_one):
    from megatron_save.checkpoint.run_checkpoint import choose_resume_checkpoint
    from megatron_save.utils.files import CorruptCheckpointError, write_manifest

    assert latest_checkpoint(tmp_path) is None and choose_resume_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    for step in (2, 3):
        (root / f"step_00000{step}" / "rng").mkdir(parents=True)
        (root / f"step_00000{step}" / "run_state.json").write_text(json.dumps({"step": step}))
        (root / f"step_00000{step}" / "rng" / "rank_00000.safetensors").write_bytes(b"0123456789")
        write_manifest(root / f"step_00000{step}")
    (root / "latest").write_text("step_000004\n")
    (root / "step_000004.tmp").mkdir()  # an interrupted write is never a candidate
    assert choose_resume_checkpoint(tmp_path) == root / "step_000003"  # latest names a missing one
    (root / "latest").write_text("step_000003\n")
    assert choose_resume_checkpoint(tmp_path) == root / "step_000003"
    # Same size, one byte changed: the size check passes, the hash does not.
    (root / "step_000003" / "rng" / "rank_00000.safetensors").write_bytes(b"0123456780")
    assert choose_resume_checkpoint(tmp_path, "size") == root / "step_000003"
    assert choose_resume_checkpoint(tmp_path) == root / "step_000002"
    (root / "step_000002" / "run_state.json").write_text('{"ste')
    with pytest.raises(CorruptCheckpointError, match=r"no checkpoint verifies .*step_000003/rng/rank_00000"
                       r".safetensors: SHA-256 differs.*step_000002/run_state.json: \d+ bytes"):
        choose_resume_checkpoint(tmp_path)


def test_metrics_file_keeps_nan_out_and_truncates_on_resume(tmp_path, world_of_one):
    writer = MetricsWriter(tmp_path, tensorboard=True, wandb_project=None, run_config={})
    writer.write(1, {"a": 1.0, "b": float("nan")})
    writer.write(2, {"a": 2.0})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "a": 1.0, "b": None}, {"step": 2, "a": 2.0}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    truncate_history(tmp_path / "metrics.jsonl", 1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_mini_batch_layout_is_the_same_at_every_data_parallel_size():
    from megatron_save.trainers.stage3.batches import mini_batch_layout

    for rows, parts, micro in ((13, 2, 1), (5, 4, 2), (3, 4, 1), (16, 2, 2)):
        blocks = {}
        for ranks in (1, 2, 4):
            layout = mini_batch_layout(rows, parts, ranks, micro)
            assert len(layout) == min(parts, rows)  # no empty mini-batch
            for part in layout:
                assert len({len(share) for share in part}) == 1  # every rank the same number of rows
                assert len(part[0]) % micro == 0 and any(i >= 0 for share in part for i in share)
            real = [sorted(i for share in part for i in share if i >= 0) for part in layout]
            assert sorted(i for block in real for i in block) == list(range(rows))
            blocks[ranks] = real
        assert blocks[1] == blocks[2] == blocks[4], (rows, parts, micro)
