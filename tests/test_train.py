import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ats_vit.cli import main
from ats_vit.train import (
    CheckpointError,
    ModelConfig,
    TrainConfig,
    evaluate,
    evaluate_budgets,
    load_checkpoint,
    load_model,
    save_checkpoint,
    train,
)

TINY = ModelConfig(
    image_size=16, patch_size=4, num_classes=3, channels=1, dim=16, depth=3, heads=2, dim_head=8, mlp_dim=32
)


def tiny_data(n: int = 96, seed: int = 0) -> TensorDataset:
    """Three classes told apart by where a bright square sits: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = 0.1 * torch.rand(n, 1, 16, 16, generator=gen)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 4 * y : 4 * y + 4, 4 * y : 4 * y + 4] = 1.0
    return TensorDataset(images, labels)


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        model=TINY, epochs=2, batch_size=16, lr=3e-3, warmup_steps=2, ckpt_every=4, out_dir=str(out), **kw
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]


def test_train_eval_budgets_and_viz(tmp_path):
    final = train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    assert final.exists() and (tmp_path / "last.safetensors").exists()
    rows = list(csv_rows(tmp_path / "metrics.csv"))
    assert rows and rows[-1]["step"] == "12"
    model, cfg = load_model(final)
    assert cfg == TINY
    result = evaluate(model, tiny_data(48, seed=1))
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["kept_per_layer"]) == 3
    budgets = evaluate_budgets(
        final, tiny_data(48, seed=1), keeps=(1.0, 0.5, 0.25), start_layer=1, timing_repeats=1
    )
    assert budgets[0]["label"] == "dense"
    assert budgets[0]["gflops"] > budgets[1]["gflops"] > budgets[2]["gflops"]
    assert budgets[2]["kept_per_layer"][-1] <= 4


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


class Crash(Exception):
    pass


class CrashingData(TensorDataset):
    """Raises after ``limit`` item reads, like a run killed mid-epoch."""

    def __init__(self, base: TensorDataset, limit: int):
        super().__init__(*base.tensors)
        self.reads, self.limit = 0, limit

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise Crash
        return super().__getitem__(i)


def test_resume_after_a_kill_gives_the_same_final_weights(tmp_path):
    data = tiny_data()
    reference = train(tiny_cfg(tmp_path / "straight"), data, progress=False)
    interrupted = tmp_path / "killed"
    with pytest.raises(Crash):
        train(tiny_cfg(interrupted), CrashingData(data, limit=16 * 7 + 5), progress=False)  # dies in step 8
    assert int(load_checkpoint(interrupted / "last.safetensors")[2]["train.step"]) == 4  # last interval kept
    resumed = train(tiny_cfg(interrupted), data, resume=True, progress=False)
    a, b = weights(reference), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    other = tiny_cfg(tmp_path)
    other.model = ModelConfig(**{**TINY.__dict__, "dim": 24})
    with pytest.raises(CheckpointError, match="was trained with"):
        train(other, tiny_data(), resume=True, progress=False)


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
    from ats_vit.train import build_model

    save_checkpoint(mismatched, build_model(TINY), ModelConfig(**{**TINY.__dict__, "dim": 24}))
    with pytest.raises(CheckpointError, match="does not fit its model config"):
        load_model(mismatched)


def test_checkpoints_hold_no_pickled_code(tmp_path):
    final = train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    header_len = int.from_bytes(final.read_bytes()[:8], "little")
    header = json.loads(final.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "ats-vit/1"
    assert all(v["dtype"] in {"F32", "I64", "U8", "BF16"} for k, v in header.items() if k != "__metadata__")


def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import tiny_cfg, tiny_data
        from ats_vit.train import train
        import torch.distributed as dist
        torch.set_num_threads(1)
        train(tiny_cfg(__import__("pathlib").Path({str(tmp_path / "ddp")!r})), tiny_data(), progress=False)
        rank = dist.get_rank()
        print("rank", rank, "world", dist.get_world_size())
        dist.destroy_process_group()
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world 2" in run.stdout
    final = tmp_path / "ddp" / "final.safetensors"
    assert final.exists()
    # each process saw half the data per step: 96 / 2 / 16 = 3 steps per epoch, 2 epochs
    assert int(load_checkpoint(tmp_path / "ddp" / "last.safetensors")[2]["train.step"]) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "missing.safetensors"], "does not exist"),
        (["viz", "missing.safetensors"], "does not exist"),
        (["train", "--data", "no/such/folder", "--epochs", "1"], "does not exist"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "x", "--keep", "0"],
        ["eval", "x", "--keep", "1.5"],
        ["train", "--epochs", "0"],
        ["viz", "x", "--images", "-1"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "expected a" in capsys.readouterr().err


def test_cli_train_eval_viz_on_the_demo_data(tmp_path, capsys):
    """The commands the demo chains, end to end on the real demo data (one short epoch)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--batch-size", "128"]) == 0
    ckpt = out / "final.safetensors"
    assert main(["eval", str(ckpt), "--keep", "1", "0.25", "--out", str(out), "--batch-size", "512"]) == 0
    assert main(["viz", str(ckpt), "--images", "3", "--output", str(out / "kept.png")]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "keep 0.25" in printed and "from layer 3" in printed
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert rows[1]["gflops"] < rows[0]["gflops"]
    assert (out / "accuracy_vs_gflops.png").exists() and (out / "kept.png").exists()


def test_timm_architecture_trains_and_evaluates_with_budgets(tmp_path):
    pytest.importorskip("timm")
    from ats_vit.train import forward_traced
    from ats_vit.viz import save_kept_tokens_grid

    cfg = tiny_cfg(tmp_path)
    cfg.model = ModelConfig(**{**TINY.__dict__, "arch": "timm"})
    final = train(cfg, tiny_data(), progress=False)
    model, loaded = load_model(final)
    assert loaded.arch == "timm" and type(model).__name__ == "VisionTransformer"
    rows = evaluate_budgets(final, tiny_data(48, seed=1), keeps=(1.0, 0.25), start_layer=1, timing_repeats=1)
    assert rows[1]["gflops"] < rows[0]["gflops"] and rows[1]["kept_per_layer"][-1] <= 4
    sampled, _ = load_model(final, max_tokens_per_depth=(16, 4, 4))
    images = tiny_data(3).tensors[0]
    with torch.no_grad():
        _, trace, _ = forward_traced(sampled.eval(), images)
    assert save_kept_tokens_grid(images, trace, 4, tmp_path / "timm.png").exists()


def test_timm_architecture_needs_matching_head_sizes():
    pytest.importorskip("timm")
    from ats_vit.train import build_model

    with pytest.raises(ValueError, match="dim_head \\* heads == dim"):
        build_model(ModelConfig(**{**TINY.__dict__, "arch": "timm", "dim_head": 4}))
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model(ModelConfig(**{**TINY.__dict__, "arch": "keras"}))


def test_cli_trains_and_evaluates_an_image_folder(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from PIL import Image

    for split in ("train", "val"):
        for k, color in enumerate(((250, 10, 10), (10, 10, 250))):
            folder = tmp_path / "data" / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), color=color).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--image-size", "32", "--patch-size", "8"]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0
    cfg = load_checkpoint(out / "final.safetensors")[0]
    assert (cfg.channels, cfg.num_classes, cfg.image_size, cfg.patch_size) == (3, 2, 32, 8)
    ckpt = str(out / "final.safetensors")
    data = str(tmp_path / "data")
    assert main(["eval", ckpt, "--data", data, "--keep", "1", "0.5", "--out", str(out)]) == 0
    assert "dense" in capsys.readouterr().out
