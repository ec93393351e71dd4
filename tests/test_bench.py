import json
import math
import time
from types import SimpleNamespace

import pytest
import torch

from ats_vit.bench import PeersConfig, SpeedConfig, peak_memory, peers, speed, time_round_robin
from ats_vit.cli import main

TINY_SPEED = dict(
    model="vit_tiny_patch16_224",
    img_size=64,
    start_layer=1,
    max_tokens=8,
    batch_sizes=(2,),
    warmup=0,
    repeats=1,
    min_seconds=0.0,
)


def test_peak_memory_counts_the_tensors_a_call_creates():
    before = torch.ones(10_000)  # exists before the call: not counted

    def fn():
        before.view(100, 100).add_(1)  # a view and an in-place op on an old tensor: nothing new
        a = torch.randn(1000, 1000)  # 4 MB
        b = a @ a  # 4 MB more: the peak
        del a
        c = b + before.sum()  # 4 MB after a was freed, + the 4-byte sum alive beside b and c
        return c.view(-1)  # a view: no new storage

    assert peak_memory(fn) == 2 * 4_000_000 + 4


def test_time_round_robin_interleaves_and_returns_medians():
    calls = []
    medians = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    calls.clear()
    bar = SimpleNamespace(n=0, total=2)
    bar.update = lambda: setattr(bar, "n", bar.n + 1)
    time_round_robin(
        {"slow": lambda: (calls.append(1), time.sleep(0.01))}, 0, 2, progress=bar, min_seconds=0.1
    )
    assert 10 <= len(calls) <= 12, "short calls repeat until they fill min_seconds"
    assert bar.n == bar.total == len(calls), "the progress bar grows with the extra rounds"


def test_speed_rows_compare_each_family_to_its_dense_model():
    pytest.importorskip("timm")
    pytest.importorskip("vit_pytorch")
    rows = speed(SpeedConfig(**TINY_SPEED))
    names = [(r["family"], r["variant"]) for r in rows]
    assert names == [
        ("timm", "dense"),
        ("timm", "ATS inverse_transform"),
        ("timm", "ATS gumbel"),
        ("seed", "dense"),
        ("seed", "ATS gumbel (seed)"),
        ("ours", "dense"),
        ("ours", "ATS inverse_transform"),
        ("ours", "ATS gumbel"),
    ]
    dense = {r["family"]: r for r in rows if r["variant"] == "dense"}
    # the same sizes give the same dense cost in all three implementations
    assert dense["timm"]["gflops"] == pytest.approx(dense["ours"]["gflops"]) == dense["seed"]["gflops"]
    for r in rows:
        base = dense[r["family"]]
        assert r["ideal"] == pytest.approx(base["gflops"] / r["gflops"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["img_per_s"] > 0 and r["peak_mib"] > 0
        if r["variant"] == "dense":
            assert r["speedup"] == 1.0 and r["kept"] == 16
        else:
            assert r["gflops"] < base["gflops"] and 1 <= r["kept"] <= 8
    assert next(r for r in rows if r["family"] == "seed" and r["variant"] != "dense")["vs_seed_ats"] == 1.0


def test_speed_without_the_seed_has_no_seed_ratio():
    pytest.importorskip("timm")
    rows = speed(SpeedConfig(**{**TINY_SPEED, "families": ("ours",), "samplers": ("topk",)}))
    assert [r["variant"] for r in rows] == ["dense", "ATS topk"]
    assert rows[1]["kept"] == 8 and all(math.isnan(r["vs_seed_ats"]) for r in rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(samplers=("fast",)), "samplers must be a non-empty subset"),
        (dict(families=()), "families must be a non-empty subset"),
        (dict(batch_sizes=(0,)), "batch_sizes must be positive"),
        (dict(repeats=0), "repeats must be >= 1"),
        (dict(min_seconds=-1.0), "min_seconds must be >= 0"),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
        (dict(device="mps"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_speed_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeedConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_speed_on_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        SpeedConfig(device="cuda")


def test_speed_start_layer_must_fit_the_model():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 12\)"):
        speed(SpeedConfig(**{**TINY_SPEED, "start_layer": 12, "families": ("timm",)}))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from test_train import tiny_cfg, tiny_data

    from ats_vit.train import train

    return train(tiny_cfg(tmp_path_factory.mktemp("run")), tiny_data(), progress=False)


def test_peers_match_ats_layer_by_layer(tiny_checkpoint):
    from test_train import tiny_data

    cfg = PeersConfig(str(tiny_checkpoint), keeps=(0.5, 0.25), start_layer=1, seeds=2, batch_size=32)
    rows = peers(cfg, tiny_data(48, seed=1))
    assert rows[0]["method"] == "dense" and rows[0]["gflops_vs_dense"] == 1.0
    assert [r["method"] for r in rows[1:5]] == [
        "ATS inverse_transform",
        "topk",
        "random",
        "ATS inverse_transform",
    ]
    for ats in (r for r in rows if r["method"].startswith("ATS")):
        matched = [r for r in rows if r["matched_to"] == ats["matched_to"] and r is not ats]
        assert {r["method"] for r in matched} == {"topk", "random"}
        schedule = [max(1, round(k)) for k in ats["kept_per_layer"]]
        for peer in matched:
            assert peer["schedule"] == schedule
            assert peer["kept_per_layer"] == pytest.approx(schedule), "peers keep exactly the matched counts"
            assert peer["gflops"] == pytest.approx(ats["gflops"], rel=0.15)
            assert peer["runs"] == (2 if peer["method"] == "random" else 1)
        assert ats["runs"] == (2 if "gumbel" in ats["method"] else 1)
        assert 0.0 <= ats["accuracy"] <= 1.0 and ats["gflops"] < rows[0]["gflops"]


def test_peers_config_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"keeps must be ratios in \(0, 1\)"):
        PeersConfig(str(tiny_checkpoint), keeps=(1.0,))
    with pytest.raises(ValueError, match="peers must be a non-empty subset"):
        PeersConfig(str(tiny_checkpoint), peers=("evit",))


def test_cli_bench_peers_writes_table_json_and_plot(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from test_train import tiny_data

    import ats_vit.cli as cli

    # the tiny checkpoint's data, not the demo set
    monkeypatch.setattr(cli, "_datasets", lambda spec, size: (None, tiny_data(48, seed=1)))
    argv = ["bench", "peers", str(tiny_checkpoint), "--keep", "0.5", "--start-layer", "1", "--seeds", "1"]
    argv += ["--json", str(tmp_path / "peers.json"), "--plot", str(tmp_path / "peers.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "matched to" in out and "topk" in out and "random" in out
    record = json.loads((tmp_path / "peers.json").read_text())
    assert record["config"]["keeps"] == [0.5] and len(record["rows"]) == 1 + 2 * 3
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_cli_bench_speed_prints_the_table_and_reports_bad_values(tmp_path, capsys):
    pytest.importorskip("timm")
    command = "bench speed --model vit_tiny_patch16_224 --img-size 64 --start-layer 1 --max-tokens 8 "
    command += "--batch-sizes 1 --repeats 1 --warmup 0 --min-seconds 0 --families ours"
    argv = command.split()
    assert main([*argv, "--json", str(tmp_path / "speed.json")]) == 0
    assert "efficiency" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "speed.json").read_text())["rows"]) == 3
    assert main([*argv[:-2], "--start-layer", "40"]) == 2
    assert "start_layer must be in [0, 12)" in capsys.readouterr().err
