"""The package as a user installs it: `python -m build` gives a wheel and an sdist, each installs
into a fresh virtual environment and runs `ats-vit --help` and the quickstart (about 2
minutes; optional: `python -m pytest -m slow tests/test_release.py`).

The environments see this machine's packages (`--system-site-packages`) so that torch is not
downloaded again; ats-vit itself comes only from the built file (`--no-deps`, and the test
checks where it was imported from)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = """
import torch
from ats_vit import ViT
from ats_vit.calibrate import calibrate
import ats_vit
print(ats_vit.__version__, ats_vit.__file__)
model = ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=4, heads=4, mlp_dim=128,
            max_tokens_per_depth=(16,) * 4).eval()
budget = calibrate(model, torch.randn(32, 3, 32, 32), target=0.6, progress=False)
print(round(budget.calibration["gflops_ratio"], 2))
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_the_built_package_installs_and_runs(dist, tmp_path, kind):
    import ats_vit

    (built,) = dist.glob(f"ats_vit-{ats_vit.__version__}*.{kind}")
    env = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env)
    python = env / "bin" / "python"
    # an sdist builds in pip's isolated environment (setuptools from the package index), as a
    # user's would; a wheel needs no build
    install = [str(python), "-m", "pip", "install", "--no-deps", str(built)]
    subprocess.run(install, check=True, capture_output=True)
    work = tmp_path / "work"  # not the repository: the source tree must not be what is imported
    work.mkdir()
    shown = subprocess.run(
        [str(env / "bin" / "ats-vit"), "--help"], check=True, capture_output=True, text=True
    )
    assert "calibrate" in shown.stdout and "demo" in shown.stdout
    ran = subprocess.run(
        [str(python), "-c", QUICKSTART], check=True, capture_output=True, text=True, cwd=work
    )
    version, location = ran.stdout.splitlines()[0].split(" ", 1)
    assert version == ats_vit.__version__
    assert str(env) in location, f"imported {location}, not the installed package"
    assert abs(float(ran.stdout.splitlines()[1]) - 0.6) <= 0.05
