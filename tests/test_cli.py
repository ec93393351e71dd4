import json
import subprocess
import sys

import pytest
import torch

from ats_vit import __version__
from ats_vit.cli import main


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "Adaptive Token Sampling" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: ats-vit" in capsys.readouterr().out


def test_module_entry_point_reports_version():
    out = subprocess.run(
        [sys.executable, "-m", "ats_vit.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "(default: 256)" in text and "--skip-bad-images" in text and "(default: None)" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "missing.safetensors"], "does not exist"),
        (["viz", "missing.safetensors"], "does not exist"),
        (["eval", "."], "is a directory, not a checkpoint file"),
        (["eval"], "give exactly one model"),
        (["eval", "x.safetensors", "--timm", "vit_tiny_patch16_224"], "give exactly one model"),
        (["eval", "x.safetensors", "--weights", "w.pth"], "go with --timm"),
        (["calibrate", "x.safetensors", "--target", "0.5", "0.7"], "{target} placeholder"),
        (["train", "--data", "no/such/folder", "--epochs", "1"], "has no train/ sub-folder"),
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
        ["calibrate", "x", "--target", "0"],
        ["train", "--epochs", "0"],
        ["viz", "x", "--images", "-1"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "expected a" in capsys.readouterr().err


def test_cli_train_calibrate_eval_viz_on_the_demo_data(tmp_path, capsys):
    """The commands the demo chains, end to end on the real demo data (one short epoch)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--batch-size", "128"]) == 0
    ckpt = str(out / "final.safetensors")
    budget = str(out / "budget.json")
    argv = [
        "calibrate",
        ckpt,
        "--target",
        "0.6",
        "--images",
        "64",
        "--start-layers",
        "2",
        "3",
        "--out",
        budget,
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    argv = ["eval", ckpt, "--budget", budget, "--keep", "0.25", "--out", str(out), "--timing-repeats", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "budget @ 0.6" in printed and "keep 0.25" in printed and "x" in printed
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "budget @ 0.6", "keep 0.25"]
    assert rows[1]["gflops_ratio"] == pytest.approx(0.6, abs=0.06), "held-out cost near the target"
    assert main(["viz", ckpt, "--budget", budget, "--images", "3", "--output", str(out / "kept.png")]) == 0
    assert (out / "accuracy_vs_gflops.png").exists() and (out / "kept.png").exists()


def test_cli_trains_and_evaluates_an_image_folder(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    from ats_vit.checkpoint import load_checkpoint

    data = str(image_folder_tree(tmp_path / "data"))
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--image-size", "32", "--patch-size", "8"]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0
    cfg = load_checkpoint(out / "final.safetensors")[0]
    assert (cfg.channels, cfg.num_classes, cfg.image_size, cfg.patch_size) == (3, 2, 32, 8)
    ckpt = str(out / "final.safetensors")
    assert (
        main(["eval", ckpt, "--data", data, "--keep", "0.5", "--out", str(out), "--timing-repeats", "0"]) == 0
    )
    assert "dense" in capsys.readouterr().out
    budget = str(tmp_path / "b.json")
    assert main(["calibrate", ckpt, "--data", data, "--target", "0.7", "--out", budget]) == 0


def test_cli_evaluates_and_calibrates_a_timm_model_from_a_weights_file(tmp_path, capsys):
    """The `--timm NAME --weights FILE` path a user with real weights takes, on a generated
    folder with only val/ for eval (and train/ for calibration)."""
    timm = pytest.importorskip("timm")
    from helpers import image_folder_tree
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=2)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    data = str(image_folder_tree(tmp_path / "data", splits=("val",), size=70))
    source = ["--timm", "vit_tiny_patch16_224", "--img-size", "64"]
    for weights in ("w.safetensors", "w.pth"):
        argv = ["eval", *source, "--weights", str(tmp_path / weights), "--data", data, "--keep", "0.5"]
        argv += ["--start-layer", "2", "--timing-repeats", "1", "--timing-batch", "4", "--out", str(tmp_path)]
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vit_tiny_patch16_224 on 8 images" in printed and "keep 0.5" in printed
    calibrate = [
        "calibrate",
        *source,
        "--weights",
        str(tmp_path / "w.pth"),
        "--data",
        data,
        "--target",
        "0.6",
    ]
    assert main([*calibrate, "--out", str(tmp_path / "b.json")]) == 2
    assert "has no train/ sub-folder" in capsys.readouterr().err
    image_folder_tree(tmp_path / "data", splits=("train",), size=70)
    argv = [*calibrate, "--no-labels", "--start-layers", "4", "6", "--out", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert "agreement" in capsys.readouterr().out
    assert main(["eval", *source, "--data", "demo"]) == 2
    assert "does not fit vit_tiny_patch16_224" in capsys.readouterr().err


def test_cli_evaluates_a_hugging_face_model_from_a_directory(tmp_path, capsys):
    pytest.importorskip("transformers")
    from helpers import HF_TINY, image_folder_tree
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(**HF_TINY, num_labels=2)
    ViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    data = str(image_folder_tree(tmp_path / "data", splits=("val",)))
    argv = ["eval", "--hf", str(tmp_path / "hf"), "--data", data, "--keep", "0.5", "--start-layer", "1"]
    assert main([*argv, "--timing-repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert rows[1]["kept_per_layer"] == [16.0, 8.0, 8.0] and rows[1]["gflops"] < rows[0]["gflops"]
