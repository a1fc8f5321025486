"""One code base on megatron-core 0.16.1 to 0.19.2: what differs between releases is detected, and these tests run
on whichever version is installed (.ci/run on 0.16.1, .ci/mcore19_leg.sh on 0.19.2)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from megatron_save.checkpoint import build_model_from_checkpoint
from megatron_save.data.chat import encode_prompt
from megatron_save.models.forward import run_model
from megatron_save.rollout import SamplingSettings


def test_a_training_forward_runs_after_a_megatron_generation(tiny_models, world_of_one):
    """megatron-core 0.18+'s static engine switches a process-wide inference flag on and never off, after which
    every GPT forward that does not gather its logits asserts: the engine confines the flag to generation."""
    from megatron_save.rollout.megatron_engine import MegatronRolloutEngine, _inference_mode

    paths = tiny_models["llama-lm"]
    policy, _, _ = build_model_from_checkpoint(paths["mg"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["hf"])
    engine = MegatronRolloutEngine(policy, tokenizer, max_sequence_length=32, max_batch_size=2)
    prompts = [encode_prompt(tokenizer, "hello")]
    rollouts = engine.generate(prompts, SamplingSettings(n=2, temperature=0.0, max_new_tokens=4))
    assert len(rollouts.response_ids[0]) == 2
    mode = _inference_mode()
    assert mode is None or not mode.is_active()

    policy.train()
    tokens = torch.tensor([prompts[0] + rollouts.response_ids[0][0]])
    logits = run_model(policy, tokens, torch.arange(tokens.shape[1]).unsqueeze(0))  # [1, S, V / TP]
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_the_collision_detection_matches_megatrons_own_group_pairing():
    """param_groups_collide_on_load reads megatron-core's pairing keys; this checks it against what the pairing
    does with two groups that differ only in their learning rate."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from megatron_save.trainers.optimizer import param_groups_collide_on_load

    def group(max_lr):
        return {"params": [], "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False,
                "is_decoupled_lr": False, "max_lr": max_lr, "min_lr": 0.0}

    saved = [group(1e-3), group(1e-5)]
    try:
        paired = MegatronOptimizer._filter_and_reorder_param_groups([group(1e-3), group(1e-5)], saved)
        swapped = [g["max_lr"] for g in paired] != [1e-3, 1e-5]
    except ValueError:
        swapped = True
    assert param_groups_collide_on_load() == swapped


def _train_state(checkpoint, monkeypatch, tagged):
    from megatron_save.trainers import optimizer

    monkeypatch.setattr(optimizer, "param_groups_collide_on_load", lambda: tagged)
    model, _, _ = build_model_from_checkpoint(checkpoint)
    settings = optimizer.OptimizerSettings(lr=1e-3, value_head_lr=3e-2, warmup_steps=1, decay_style="linear")
    return optimizer.build_train_state(model, settings, total_steps=4)


def _one_step(state):
    state.model.zero_grad_buffer()
    for param in state.model.parameters():
        param.main_grad.fill_(0.01)
    state.optimizer.step()
    state.scheduler.step(1)


@pytest.mark.parametrize("record", ["recorded", "older megatron-save"])
def test_a_run_saved_with_a_tagged_value_head_group_resumes_where_no_tag_is_needed(
        record, tiny_models, tmp_path, monkeypatch, world_of_one):
    """A run started on a release whose param groups collide on load (value head tagged with lr_mult) resumes on
    one that needs no tag: the groups take the tags they were saved with (recorded in train_state.json; a
    checkpoint of an older megatron-save records none and always tagged the value head)."""
    from megatron_save.checkpoint.train_checkpoint import (
        TRAIN_STATE_FILE,
        VALUE_HEAD_GROUP_TAG,
        load_train_checkpoint,
        save_train_checkpoint,
    )
    from megatron_save.trainers.optimizer import group_learning_rates, is_value_head_group

    checkpoint = tiny_models["llama-rmv"]["mg"]
    first = _train_state(checkpoint, monkeypatch, tagged=True)
    assert [g.get("lr_mult") == VALUE_HEAD_GROUP_TAG for g in first.optimizer.param_groups] == [
        is_value_head_group(g) for g in first.optimizer.param_groups]
    _one_step(first)
    save_train_checkpoint(first, tmp_path, step=1)
    if record != "recorded":
        payload = json.loads((tmp_path / TRAIN_STATE_FILE).read_text())
        del payload["group_lr_mults"], payload["megatron_core"]
        (tmp_path / TRAIN_STATE_FILE).write_text(json.dumps(payload))
    resumed = _train_state(checkpoint, monkeypatch, tagged=False)
    assert not any(g.get("lr_mult") == VALUE_HEAD_GROUP_TAG for g in resumed.optimizer.param_groups)
    assert load_train_checkpoint(resumed, tmp_path) == 1
    assert group_learning_rates(resumed) == group_learning_rates(first)
    assert sum(is_value_head_group(g) for g in resumed.optimizer.param_groups) == 1
    for before, after in zip(first.optimizer.param_groups, resumed.optimizer.param_groups):
        assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
        assert before.get("lr_mult") == after.get("lr_mult")


def _copy(tiny_models, tmp_path, name="llama-lm"):
    import shutil

    checkpoint = tmp_path / name
    shutil.copytree(tiny_models[name]["mg"], checkpoint)
    return checkpoint


def test_the_manifest_refuses_any_file_it_does_not_list(tiny_models, tmp_path, world_of_one):
    """megatron-core 0.19 writes no weights/common.pt, so a planted one is a new file, not a changed one: refused
    like any file of the checkpoint's own entries the manifest does not list (hidden ones included); what a trainer
    writes beside them (metrics) is not the checkpoint's."""
    from megatron_save.checkpoint.model_checkpoint import CHECKPOINT_PARTS, verify_collectively
    from megatron_save.utils.files import MANIFEST_FILE, CorruptCheckpointError, verify_manifest

    checkpoint = _copy(tiny_models, tmp_path)
    listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    assert "weights/.metadata" in listed and "megatron_save.json" in listed
    (checkpoint / "metrics.json").write_text("{}")
    assert verify_manifest(checkpoint, parts=CHECKPOINT_PARTS)
    for planted in ("weights/common.pt", "weights/extra.pt", "weights/.hidden", "hf/tokenizer.model"):
        copy = _copy(tiny_models, tmp_path / planted.replace("/", "_"))
        if (copy / planted).exists():
            continue  # 0.16.1 writes common.pt: a changed one is refused by size or hash
        (copy / planted).write_bytes(b"planted")
        with pytest.raises(CorruptCheckpointError, match=rf"{planted}: not listed in .*manifest.json"):
            verify_collectively(copy, "size")
        with pytest.raises(CorruptCheckpointError, match=rf"{planted}: not listed in"):
            build_model_from_checkpoint(copy)


def test_a_manifest_of_an_older_megatron_save_still_verifies(tiny_models, tmp_path, world_of_one):
    """Manifests written before version 2 list no hidden files and no scope: they verify as before, and a planted
    file that is not hidden is still refused."""
    from megatron_save.checkpoint.model_checkpoint import CHECKPOINT_PARTS
    from megatron_save.utils.files import MANIFEST_FILE, CorruptCheckpointError, verify_manifest

    checkpoint = _copy(tiny_models, tmp_path)
    files = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    old = {name: entry for name, entry in files.items() if not any(p.startswith(".") for p in name.split("/"))}
    (checkpoint / MANIFEST_FILE).write_text(json.dumps({"files": old}))
    (checkpoint / "checkpoints").mkdir()
    (checkpoint / "checkpoints" / "train_state.json").write_text("{}")  # a trainer's, beside the model
    assert verify_manifest(checkpoint, parts=CHECKPOINT_PARTS)
    (checkpoint / "weights" / "common.pt.bak").write_bytes(b"planted")
    with pytest.raises(CorruptCheckpointError, match=r"weights/common.pt.bak: not listed"):
        verify_manifest(checkpoint, parts=CHECKPOINT_PARTS)


def test_checkpoints_record_their_megatron_core_and_a_newer_ones_are_refused(tiny_models, tmp_path, world_of_one):
    from megatron_save.checkpoint.megatron_version import installed_megatron_core
    from megatron_save.checkpoint.model_checkpoint import CHECKPOINT_PARTS, META_FILE
    from megatron_save.checkpoint.train_checkpoint import TRAIN_STATE_FILE, load_train_checkpoint
    from megatron_save.utils.files import write_manifest

    installed = installed_megatron_core()
    checkpoint = _copy(tiny_models, tmp_path)
    meta = json.loads((checkpoint / META_FILE).read_text())
    assert meta["megatron_core"] == installed
    major, minor, *_ = installed.split(".")
    for written_by, refused in ((f"{major}.{int(minor) + 1}.0", True), (f"{int(major) + 1}.0.0", True),
                                (f"{major}.{minor}.99", False), (None, False)):
        (checkpoint / META_FILE).write_text(json.dumps({**meta, "megatron_core": written_by}))
        write_manifest(checkpoint, CHECKPOINT_PARTS)
        if refused:
            with pytest.raises(ValueError, match=rf"{checkpoint} was written by megatron-core {written_by}, this "
                                                 rf"environment has megatron-core {installed}"):
                build_model_from_checkpoint(checkpoint)
        else:  # a patch release, or a checkpoint from before the version was recorded
            build_model_from_checkpoint(checkpoint)
    train = tmp_path / "train"
    train.mkdir()
    (train / TRAIN_STATE_FILE).write_text(json.dumps({"step": 1, "megatron_core": f"{int(major) + 1}.0"}))
    with pytest.raises(ValueError, match=rf"was written by megatron-core {int(major) + 1}.0, this environment has"):
        load_train_checkpoint(None, train)
