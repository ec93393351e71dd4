import pytest
from helpers import tiny_cfg, tiny_data

from ats_vit.train import train


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny model, trained once for every test that needs one."""
    return train(tiny_cfg(tmp_path_factory.mktemp("tiny-run")), tiny_data(), progress=False)
