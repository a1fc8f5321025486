"""Nothing of ours is unpickled from a checkpoint: RNG states are tensors and JSON in safetensors, and a planted
malicious pickle is never executed on resume."""

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
