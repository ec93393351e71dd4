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


def test_a_config_claiming_a_huge_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """A 372-byte file whose metadata says dim 2048 / mlp 8192 made load_model allocate the
    model first: the config's shapes are now checked on the meta device."""
    import json

    from safetensors.torch import save_file

    import ats_vit.checkpoint as checkpoint
    from ats_vit.models import ModelConfig

    path = tmp_path / "small.safetensors"
    cfg = {**ModelConfig().__dict__, "dim": 2048, "mlp_dim": 8192, "heads": 16, "dim_head": 128}
    save_file(
        {"model.cls_token": torch.zeros(1, 1, 2)},
        str(path),
        metadata={"format": "ats-vit/1", "model_config": json.dumps(cfg)},
    )
    built = []
    real = checkpoint.build_model
    monkeypatch.setattr(checkpoint, "build_model", lambda c: built.append(torch.empty(0).device) or real(c))
    with pytest.raises(
        CheckpointError, match=r"small.safetensors' does not fit its model config: .*missing keys"
    ):
        load_model(path)
    assert built == [torch.device("meta")], "only the meta-device skeleton was built"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dim", "big", "field 'dim' must be int"),
        ("depth", -3, "field 'depth' must be >= 0"),
        ("arch", 7, "field 'arch' must be str"),
    ],
)
def test_bad_types_in_a_checkpoints_config_name_the_file_and_field(tmp_path, field, value, match):
    import json

    from safetensors.torch import save_file

    from ats_vit.models import ModelConfig

    path = tmp_path / "odd.safetensors"
    cfg = {**ModelConfig().__dict__, field: value}
    save_file(
        {"model.x": torch.zeros(1)},
        str(path),
        metadata={"format": "ats-vit/1", "model_config": json.dumps(cfg)},
    )
    with pytest.raises(CheckpointError, match=f"odd.safetensors'.*{match}"):
        load_model(path)
