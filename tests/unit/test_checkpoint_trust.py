"""Nothing of ours is unpickled from a checkpoint: RNG states are tensors and JSON in safetensors, and a planted
malicious pickle is never executed on resume. A checkpoint whose format has a manifest is refused without it, and a
checkpoint verified once is verified again when a file of it changed."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_save.checkpoint.run_checkpoint import (
    RUN_STATE_FILE,
    _layout,
    load_rng_states,
    load_run_checkpoint,
    rng_file,
    save_rng_states,
)


class Planted:
    """Unpickling this creates the file named in its argument: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_rng_states_round_trip_without_pickle(tmp_path, world_of_one):
    path = tmp_path / "rank_00000.safetensors"
    random.gauss(0, 1)  # a cached Gaussian in Python's state
    save_rng_states(path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    load_rng_states(path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert path.read_bytes()[:8] != pickle.dumps(None)[:8]


def _checkpoint(tmp_path):
    checkpoint = tmp_path / "step_000001"
    (checkpoint / "rng").mkdir(parents=True)
    (checkpoint / RUN_STATE_FILE).write_text(json.dumps({"step": 1, "counters": {}, "layout": _layout()}))
    return checkpoint


def test_a_planted_pickle_of_rng_states_is_not_executed(tmp_path, world_of_one):
    checkpoint, marker = _checkpoint(tmp_path), tmp_path / "pwned"
    torch.save(Planted(marker), checkpoint / "rng" / "rank_00000.pt")  # where older versions kept RNG states
    with pytest.raises(FileNotFoundError, match="pickle files .* not loaded since a pickle can run code"):
        load_run_checkpoint(checkpoint, {})
    # The same pickle under the name we read: safetensors refuses it as a file, it does not unpickle it.
    (checkpoint / "rng" / "rank_00000.pt").rename(rng_file(checkpoint, 0))
    with pytest.raises(Exception):
        load_run_checkpoint(checkpoint, {})
    assert not marker.exists()


def test_a_planted_pickle_in_megatrons_common_state_is_not_executed(tiny_models, tmp_path, world_of_one,
                                                                     monkeypatch):
    """The manifest refuses a doctored common.pt before anything reads it (megatron-core 0.16.1 writes one, so it
    changed; 0.19 writes none, so it is a file the manifest does not list); and without verification,
    dist_checkpointing reads it with torch.load's weights_only (torch >= 2.6 default), which refuses it too. (Its
    .metadata is plain pickle by torch's format: see README, trusting checkpoints.)"""
    import shutil

    from megatron_save.checkpoint import build_model_from_checkpoint
    from megatron_save.utils.files import CorruptCheckpointError

    checkpoint, marker = tmp_path / "doctored", tmp_path / "pwned"
    shutil.copytree(tiny_models["llama-lm"]["mg"], checkpoint)
    torch.save(Planted(marker), checkpoint / "weights" / "common.pt")
    with pytest.raises(CorruptCheckpointError,
                       match=r"weights/common.pt: (\d+ bytes, .*manifest.json says|not listed in .*manifest.json)"):
        build_model_from_checkpoint(checkpoint)
    monkeypatch.setenv("MEGATRON_SAVE_VERIFY", "off")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        build_model_from_checkpoint(checkpoint)
    assert not marker.exists()


def test_flipped_bytes_in_a_shard_stop_an_export_naming_the_file(tiny_models, tmp_path, world_of_one):
    import shutil

    from megatron_save.checkpoint.convert import convert_megatron_to_hf
    from megatron_save.utils.files import CorruptCheckpointError

    checkpoint = tmp_path / "damaged"
    shutil.copytree(tiny_models["llama-lm"]["mg"], checkpoint)
    shard = sorted((checkpoint / "weights").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    middle = slice(len(data) // 2, len(data) // 2 + 4000)
    data[middle] = bytes(b ^ 0xFF for b in data[middle])
    shard.write_bytes(bytes(data))  # same size: only the hash can tell
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: SHA-256 differs"):
        convert_megatron_to_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def _model_checkpoint(root, **meta):
    """A model checkpoint's files (megatron_save.json with ``meta``, hf/, weights/) and its manifest: what
    verification reads, without a model."""
    from megatron_save.checkpoint.model_checkpoint import CHECKPOINT_PARTS, META_FILE
    from megatron_save.utils.files import write_manifest

    (root / "hf").mkdir(parents=True)
    (root / "weights").mkdir()
    (root / META_FILE).write_text(json.dumps({"family": "llama", "kind": "causal_lm", "dtype": "fp32", **meta}))
    (root / "hf" / "config.json").write_text("{}")
    (root / "weights" / "0.distcp").write_bytes(b"0123456789")
    write_manifest(root, CHECKPOINT_PARTS)
    return root


@pytest.mark.parametrize("meta, refused", [({"format_version": 2, "megatron_core": "0.16.1"}, True),
                                           ({"format_version": 1, "megatron_core": "0.16.1"}, True),
                                           ({"format_version": 1}, False)])
def test_a_model_checkpoint_without_its_manifest_loads_only_if_its_format_predates_manifests(meta, refused, tmp_path,
                                                                                            world_of_one):
    from megatron_save.checkpoint.model_checkpoint import load_model_checkpoint
    from megatron_save.utils.files import MANIFEST_FILE, CorruptCheckpointError

    checkpoint = _model_checkpoint(tmp_path / "ckpt", **meta)
    (checkpoint / MANIFEST_FILE).unlink()
    if refused:
        # The load's first step: nothing of the model is touched before the refusal.
        with pytest.raises(CorruptCheckpointError, match=rf"{checkpoint / MANIFEST_FILE}: missing, though "
                                                         rf".*megatron_save.json records format_version"):
            load_model_checkpoint(None, checkpoint)
    else:
        with pytest.raises(AttributeError, match="sharded_state_dict"):  # verification let it through to the model
            load_model_checkpoint(None, checkpoint)


def test_the_checkpoint_format_written_now_has_a_manifest_and_older_ones_stay_readable():
    from megatron_save.checkpoint.model_checkpoint import FORMAT_VERSION, READABLE_FORMATS, CheckpointMeta

    assert CheckpointMeta("llama", "causal_lm", "fp32").format_version == FORMAT_VERSION == 2
    assert READABLE_FORMATS == (1, 2)


def test_a_verified_checkpoint_is_verified_again_when_a_file_changes(tmp_path, world_of_one, monkeypatch):
    """The cache of verified checkpoints is keyed on the files' sizes and mtimes, not on the manifest's alone: a
    shard rewritten after a verification (same size, same manifest) is caught by the next load."""
    import os

    from megatron_save.checkpoint import model_checkpoint
    from megatron_save.utils.files import CorruptCheckpointError

    checkpoint = _model_checkpoint(tmp_path / "ckpt", format_version=2, megatron_core="0.16.1")
    checks = []
    verify = model_checkpoint.verify_manifest
    monkeypatch.setattr(model_checkpoint, "verify_manifest", lambda *a, **k: checks.append(a[0]) or verify(*a, **k))
    model_checkpoint.verify_collectively(checkpoint)
    model_checkpoint.verify_collectively(checkpoint)
    assert len(checks) == 1  # the second load of an unchanged checkpoint reads no file again
    shard = checkpoint / "weights" / "0.distcp"
    mtime = shard.stat().st_mtime_ns
    shard.write_bytes(b"0123456780")
    os.utime(shard, ns=(mtime + 10**9, mtime + 10**9))  # a coarse-mtime file system would show the rewrite so
    with pytest.raises(CorruptCheckpointError, match=rf"{shard}: SHA-256 differs"):
        model_checkpoint.verify_collectively(checkpoint)
    shard.write_bytes(b"0123456789")
    model_checkpoint.verify_collectively(checkpoint)
    (checkpoint / "weights" / "planted.pt").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match="planted.pt: not listed"):
        model_checkpoint.verify_collectively(checkpoint)


def test_a_run_checkpoint_without_its_manifest_is_refused_unless_it_predates_manifests(tmp_path, world_of_one):
    from megatron_save.checkpoint.run_checkpoint import choose_resume_checkpoint, save_run_checkpoint
    from megatron_save.utils.files import MANIFEST_FILE, CorruptCheckpointError

    checkpoint = save_run_checkpoint(tmp_path, 1, {}, {}, keep=1, settings={})
    assert json.loads((checkpoint / RUN_STATE_FILE).read_text())["format_version"] == 2
    assert choose_resume_checkpoint(tmp_path) == checkpoint
    (checkpoint / MANIFEST_FILE).unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{checkpoint / MANIFEST_FILE}: missing, though "
                                                     rf".*run_state.json records format_version 2"):
        choose_resume_checkpoint(tmp_path)
    # No format recorded, but a training checkpoint records its megatron-core: written after manifests existed.
    (checkpoint / RUN_STATE_FILE).write_text(json.dumps({"step": 1, "counters": {}, "layout": _layout()}))
    (checkpoint / "policy").mkdir()
    (checkpoint / "policy" / "train_state.json").write_text(json.dumps({"step": 1, "megatron_core": "0.16.1"}))
    with pytest.raises(CorruptCheckpointError, match=r"policy/train_state.json records megatron_core 0.16.1"):
        choose_resume_checkpoint(tmp_path)
    (checkpoint / "policy" / "train_state.json").write_text(json.dumps({"step": 1}))
    assert choose_resume_checkpoint(tmp_path) == checkpoint  # older than manifests: taken unverified
