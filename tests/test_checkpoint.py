import json
import os

import pytest
import torch
from helpers import TINY

from ats_vit.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from ats_vit.models import ModelConfig, build_model


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(corrupt)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not written by ats-vit"):
        load_checkpoint(foreign)
    mismatched = tmp_path / "mismatched.safetensors"
    save_checkpoint(mismatched, build_model(TINY), ModelConfig(**{**TINY.__dict__, "dim": 24}))
    with pytest.raises(CheckpointError, match="does not fit its model config"):
        load_model(mismatched)


def test_a_directory_is_not_a_checkpoint(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file$"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"did you mean .*final\.safetensors"):
        load_checkpoint(tiny_checkpoint.parent)


def test_checkpoints_hold_no_pickled_code_and_round_trip(tmp_path, tiny_checkpoint):
    header_len = int.from_bytes(tiny_checkpoint.read_bytes()[:8], "little")
    header = json.loads(tiny_checkpoint.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "ats-vit/1"
    assert all(v["dtype"] in {"F32", "I64", "U8", "BF16"} for k, v in header.items() if k != "__metadata__")
    model, cfg = load_model(tiny_checkpoint)
    save_checkpoint(tmp_path / "copy.safetensors", model, cfg)
    again, cfg_again = load_model(tmp_path / "copy.safetensors")
    assert cfg_again == cfg
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
