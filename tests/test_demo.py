"""The demo's promised results, end to end (about 4-5 minutes on 2 CPU cores).

Optional: run with `python -m pytest -m slow`.
"""

import json

import pytest

from ats_vit.cli import main


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    dense = rows[0]
    assert dense["label"] == "dense" and dense["accuracy"] >= 0.95
    cheap = [r for r in rows[1:] if r["gflops"] <= 0.6 * dense["gflops"]]
    assert cheap, "some budget must cut GFLOPs by at least 40%"
    assert max(r["accuracy"] for r in cheap) >= dense["accuracy"] - 0.01
    for name in ("final.safetensors", "metrics.csv", "accuracy_vs_gflops.png", "kept_tokens.png"):
        assert (out / name).exists()
