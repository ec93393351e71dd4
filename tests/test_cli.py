import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ats_vit import __version__
from ats_vit.cli import main


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "Adaptive Token Sampling" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: ats-vit" in capsys.readouterr().err


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


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_shows_defaults_including_zero(capsys):
    text = help_text(["eval"], capsys)
    assert "(default: 256)" in text and "--skip-bad-images" in text and "(default: None)" not in text
    assert "data loading processes (default: 0)" in text


@pytest.mark.parametrize("bench", ["speed", "frontier", "train"])
def test_every_bench_option_has_help_and_a_description(bench, capsys):
    from ats_vit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    command = next(a for a in sub._actions if a.dest == "bench").choices[bench]
    assert command.description, f"bench {bench} has no description"
    missing = [a.dest for a in command._actions if not a.help and a.dest != "help"]
    assert not missing, f"bench {bench} options without help: {missing}"
    assert "(default: " in help_text(["bench", bench], capsys)


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
        (
            ["train", "--data", "no/such/folder", "--epochs", "1"],
            "data folder 'no/such/folder' does not exist",
        ),
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
        "--calib-images",
        "64",
        "--start-layers",
        "2",
        "3",
        "--out",
        budget,
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    argv = ["eval", ckpt, "--budget", budget, "--keep", "0.25", "--out", str(out), "--timing-repeats", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split()}
    assert "dense" in lines and "budget" in lines and "keep" in lines
    assert re.search(r"\d+\.\d+x \(\d+\.\d+-\d+\.\d+\)", lines["keep"]), "speed-up with its IQR"
    assert "interleaved rounds, each one forward pass over a batch of 64 images" in printed
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "budget @ 0.6", "keep 0.25"]
    assert rows[1]["gflops_ratio"] == pytest.approx(0.6, abs=0.06), "held-out cost near the target"
    assert main(["viz", ckpt, "--budget", budget, "--images", "3", "--out", str(out / "kept.png")]) == 0
    assert (out / "accuracy_vs_gflops.png").exists() and (out / "kept.png").exists()


def test_cli_trains_and_evaluates_an_image_folder(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    from ats_vit.checkpoint import load_checkpoint

    data = str(image_folder_tree(tmp_path / "data"))
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--img-size", "32", "--patch-size", "8"]
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
        argv += ["--start-layer", "2", "--timing-repeats", "1", "--timing-batch", "4"]
        argv += ["--out", str(tmp_path / f"eval-{weights}")]
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
    assert main(["eval", *source, "--data", "glyphs@1"]) == 2
    assert "the glyphs data (1 x 56 x 56 images) does not fit" in capsys.readouterr().err
    # another architecture's weights: counts and a few names, on one short line
    other = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=2)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    argv = ["eval", *source, "--weights", str(tmp_path / "other.safetensors"), "--data", data]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "keys of another shape (file vs model)" in err and len(err) < 700 and "\n" not in err


def test_cli_evaluates_a_hugging_face_model_from_a_directory(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")  # image folders
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


# ---------------------------------------------------------------- what a new user hits (issue 16)


def a_run(tmp_path, tiny_checkpoint):
    """A copy of the tiny run folder (final, last, config, metrics)."""
    import shutil

    run = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint.parent, run)
    return run


def test_finetuning_into_the_source_run_is_refused_and_the_source_untouched(
    tmp_path, tiny_checkpoint, capsys
):
    run = a_run(tmp_path, tiny_checkpoint)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    ckpt = str(run / "final.safetensors")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["finetune", ckpt, "--keep", "0.5", "--start-layer", "1", "--out", str(run), *extra]) == 2
        assert "is a file this run would write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_training_into_an_existing_run_says_how_to_resume_or_overwrite(tmp_path, tiny_checkpoint, capsys):
    run = a_run(tmp_path, tiny_checkpoint)
    before = (run / "final.safetensors").read_bytes()
    assert main(["train", "--out", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume continues it, --overwrite replaces it" in err
    assert (run / "final.safetensors").read_bytes() == before


def test_other_outputs_are_not_written_over(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    data = str(image_folder_tree(tmp_path / "data", size=16, mode="L"))
    ckpt = str(tiny_checkpoint)
    existing = tmp_path / "b.json"
    existing.write_text("mine")
    assert main(["calibrate", ckpt, "--data", data, "--target", "0.7", "--out", str(existing)]) == 2
    assert "b.json already exist(s); pass --overwrite" in capsys.readouterr().err
    assert existing.read_text() == "mine"
    picture = tmp_path / "kept.png"
    picture.write_bytes(b"mine")
    assert main(["viz", ckpt, "--data", data, "--out", str(picture), "--start-layer", "1"]) == 2
    assert picture.read_bytes() == b"mine"
    argv = ["viz", ckpt, "--data", data, "--out", str(picture), "--start-layer", "1", "--overwrite"]
    assert main(argv) == 0 and picture.read_bytes()[:4] == b"\x89PNG"


def test_a_one_channel_checkpoint_evaluates_a_grayscale_folder(tmp_path, tiny_checkpoint, capsys):
    """The tiny run, like the demo, has 1 channel: folder images are read in its channel
    count. The folder has 2 classes and the model scores 3: a warning says so."""
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    data = str(image_folder_tree(tmp_path / "data", splits=("val",), size=20, mode="L"))
    argv = ["eval", str(tiny_checkpoint), "--data", data, "--keep", "0.5", "--start-layer", "1"]
    assert main([*argv, "--timing-repeats", "3", "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    assert "has 2 classes and" in err and "scores 3" in err and "--no-labels" in err
    # 8 images and a timing batch of 64: the timing says what ran
    assert "over a batch of 8 images (the whole split: fewer than --timing-batch 64)" in out
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"]
    assert [r["timing_images"] for r in rows] == [8, 8]


def test_budgets_are_checked_against_the_model_before_any_work(tmp_path, tiny_checkpoint, capsys):
    from ats_vit.budget import Budget

    deep = Budget(3, (8,) * 9, depth=12, num_patches=16).save(tmp_path / "deep.json")
    wide = Budget(1, (8, 8), depth=3, num_patches=64).save(tmp_path / "wide.json")
    for path, message in ((deep, "with depth=12; ats_vit.ViT has depth=3"), (wide, "num_patches=64")):
        for command in (["eval"], ["viz"], ["finetune"]):
            out = tmp_path / ("x.png" if command == ["viz"] else "x")
            argv = [*command, str(tiny_checkpoint), "--budget", str(path), "--out", str(out)]
            assert main(argv) == 2, command
            err = capsys.readouterr().err
            assert str(path.name) in err and message in err, (command, err)
            assert "accuracy" not in err


def test_missing_data_folders_say_they_do_not_exist(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint), "--data", "no/such/folder"]) == 2
    assert "data folder 'no/such/folder' does not exist" in capsys.readouterr().err


def test_pretrained_weights_without_network_fail_in_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", "--timm", "vit_tiny_patch16_224", "--pretrained", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not load timm's pretrained weights" in err


def test_unsupported_and_unknown_models_fail_in_one_line(capsys):
    pytest.importorskip("timm")
    argv = ["bench", "speed", "--model", "resnet18", "--families", "timm", "--batch-sizes", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        "ats-vit bench speed: error: ats-vit serves"
    )
    assert err.endswith("got ResNet")
    assert main(["eval", "--timm", "no_such_vit"]) == 2
    assert "timm has no model named 'no_such_vit'" in capsys.readouterr().err


def test_weights_at_another_image_size_are_resampled(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from helpers import image_folder_tree
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=2)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    data = str(image_folder_tree(tmp_path / "data", splits=("val",), size=100))
    argv = [
        "eval",
        "--timm",
        "vit_tiny_patch16_224",
        "--img-size",
        "96",
        "--weights",
        str(tmp_path / "w.safetensors"),
    ]
    assert main([*argv, "--data", data, "--timing-repeats", "0", "--out", str(tmp_path / "ev")]) == 0
    assert "vit_tiny_patch16_224 on 8 images" in capsys.readouterr().out


def test_calibrate_takes_skip_bad_images(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    data = image_folder_tree(tmp_path / "data", size=16, mode="L")
    (data / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    argv = [
        "calibrate",
        str(tiny_checkpoint),
        "--data",
        str(data),
        "--target",
        "0.8",
        "--out",
        str(tmp_path / "b.json"),
    ]
    assert main(argv) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main([*argv, "--skip-bad-images", "--no-labels"]) == 0  # 7 of 8 images: each its own item
    capsys.readouterr()
    assert main([*argv, "--skip-bad-images", "--holdout", "0.25", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "calibration images, 2 of them held out of the search" in out
    assert "held out (2 images):" in out
    assert json.loads((tmp_path / "b.json").read_text())["calibration"]["holdout_images"] == 2


def test_ctrl_c_during_training_says_where_to_resume(tmp_path, monkeypatch, capsys):
    import ats_vit.train

    def interrupted(cfg, data, **kwargs):
        raise ats_vit.train.TrainingInterrupted("stopped at step 3 of 12; the last checkpoint is X (step 2)")

    monkeypatch.setattr(ats_vit.train, "train", interrupted)
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 130
    err = capsys.readouterr().err.strip()
    assert "ats-vit train: interrupted: stopped at step 3 of 12; the last checkpoint is X (step 2)" in err
    assert err.endswith(f"continue with `ats-vit train --out {tmp_path / 'run'} --resume`")
    assert "Traceback" not in err


def test_progress_lines_in_logs_have_no_carriage_returns_and_no_repeats(monkeypatch):
    import io

    import ats_vit._progress as progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    log = io.StringIO()
    bar = progress.bar(total=5, desc="x", file=log)
    for _ in range(5):
        bar.update()
        bar.set_postfix(loss=1.0, refresh=False)
        bar.refresh()  # what tqdm's monitor would do: the same status again
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == len(set(lines)) == 6 and lines[-1].startswith("x: 100%")


def test_config_is_printed_one_field_per_line(capsys):
    from ats_vit.cli import _print_config
    from ats_vit.train import TrainConfig

    _print_config(TrainConfig())
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "config:" and "  model:" in err and "    dim: 96" in err and "  epochs: 10" in err


def test_cli_loads_a_hugging_face_tower_as_a_tower(tmp_path, capsys):
    """A checkpoint saved as a feature tower is not given a random classifier head: viz draws
    what it kept, calibrate keeps its features close to the dense ones, eval refuses (no
    accuracy without a classifier), and a video model is refused with a hint."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")  # image folders
    from helpers import HF_TINY, image_folder_tree
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**HF_TINY)).save_pretrained(tmp_path / "tower")
    processor = BitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    processor.save_pretrained(tmp_path / "tower")
    data = str(image_folder_tree(tmp_path / "data", splits=("train", "val")))
    out = tmp_path / "kept.png"
    argv = ["viz", "--hf", str(tmp_path / "tower"), "--data", data, "--images", "2", "--keep", "0.5"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["eval", "--hf", str(tmp_path / "tower"), "--data", data, "--out", str(tmp_path / "e")]) == 2
    assert "Dinov2Model has no classification head" in capsys.readouterr().err
    budget = tmp_path / "tower.json"
    argv = ["calibrate", "--hf", str(tmp_path / "tower"), "--data", data, "--target", "0.6"]
    assert main([*argv, "--calib-images", "16", "--out", str(budget)]) == 0
    assert "(fidelity;" in capsys.readouterr().out
    calibration = json.loads(budget.read_text())["calibration"]
    assert 0.5 < calibration["fidelity"] <= 1.0 and calibration["dense_fidelity"] == 1.0
    video = dict(HF_TINY, num_frames=4, tubelet_size=2)
    VideoMAEModel(VideoMAEConfig(**video)).save_pretrained(tmp_path / "video")
    BitImageProcessor().save_pretrained(tmp_path / "video")
    argv = ["viz", "--hf", str(tmp_path / "video"), "--data", data, "--out", str(out), "--overwrite"]
    assert main(argv) == 2
    assert "VideoMAEModel is a video model; the command line reads images" in capsys.readouterr().err


def test_demo_chains_its_steps_and_times_budgets_at_one_batch(tmp_path, monkeypatch, capsys):
    """The demo's calibration ranks equally accurate budgets by their time at the batch its
    eval times them at (no step runs here: each is recorded); a second run without --resume
    or --overwrite is refused."""
    import ats_vit.cli as cli

    ran = []
    for name in ("cmd_train", "cmd_calibrate", "cmd_eval", "cmd_viz"):
        monkeypatch.setattr(cli, name, lambda args, name=name: ran.append((name, args)) or 0)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert [name for name, _ in ran] == ["cmd_train", "cmd_calibrate", "cmd_eval", "cmd_viz", "cmd_viz"]
    calibrate, evaluate = ran[1][1], ran[2][1]
    assert calibrate.cost == "gflops" and calibrate.target == [0.5, 0.7]
    assert calibrate.timing_batch == evaluate.timing_batch == cli.DEMO_TIMING_BATCH
    (tmp_path / "eval.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "already holds a demo run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "old", "new"),
    [
        (["viz", "CKPT", "--start-layer", "1", "--output", "OUT/kept.png"], "--output", "--out"),
        (
            ["calibrate", "CKPT", "--target", "0.7", "--images", "32", "--out", "OUT/b.json"],
            "--images",
            "--calib-images",
        ),
    ],
)
def test_0_x_option_names_still_work_warn_and_are_hidden_from_help(
    tiny_checkpoint, tmp_path, capsys, argv, old, new
):
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    data = str(image_folder_tree(tmp_path / "data", size=16, mode="L"))
    argv = [a.replace("CKPT", str(tiny_checkpoint)).replace("OUT", str(tmp_path)) for a in argv]
    assert main([*argv, "--data", data]) == 0
    err = capsys.readouterr().err
    assert f"warning: {old} is deprecated since ats-vit 1.0 and will be removed in 2.0; use {new}" in err
    out = Path(argv[-1])
    assert out.is_file(), f"{old} set {new}"
    with pytest.raises(SystemExit):
        main([argv[0], "--help"])
    shown = capsys.readouterr().out
    assert new in shown and f"{old} " not in shown


def test_a_resume_takes_the_runs_own_settings_and_ends_as_the_uninterrupted_run(
    tmp_path, monkeypatch, capsys
):
    """0.x resumed `train --epochs 3` at "step 100 of 780" (the default 10 epochs) and ended
    elsewhere: a resume takes the run's config; only the options given may differ, and those
    that contradict it are refused."""
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree, weights

    import ats_vit.train as train_module

    data = str(image_folder_tree(tmp_path / "data", size=16))
    argv = ["train", "--data", data, "--img-size", "16", "--patch-size", "8", "--epochs", "3"]
    argv += ["--batch-size", "2", "--ckpt-every", "2"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    real = train_module._lr_at

    def interrupt(step, total, cfg):
        if step == 5:
            raise KeyboardInterrupt
        return real(step, total, cfg)

    with monkeypatch.context() as m:
        m.setattr(train_module, "_lr_at", interrupt)
        assert main([*argv, "--out", str(tmp_path / "cut")]) == 130
    assert f"continue with `ats-vit train --out {tmp_path / 'cut'} --resume`" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "cut"), "--epochs", "10", "--resume"]) == 2
    assert "configured with epochs=3 (asked 10)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert "at step 4 of 12" in capsys.readouterr().err
    a, b = weights(tmp_path / "whole" / "final.safetensors"), weights(tmp_path / "cut" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ends as the uninterrupted one"


def test_ctrl_c_in_the_demo_advises_resuming_the_demo(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    import ats_vit.train as train_module

    def interrupt(step, total, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_lr_at", interrupt)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 130
    assert f"continue with `ats-vit demo --out {tmp_path / 'demo'} --resume`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("out", "targets", "message"),
    [
        ("b-{target}.json", ["0.5000001", "0.5"], None),  # distinct files, not one written twice
        ("b.json", ["0.5", "0.5"], "several targets need an --out with a {target} placeholder"),
        ("b-{target:.1f}.json", ["0.51", "0.54"], "would both write"),
        ("b-{foo}.json", ["0.5"], r"--out may hold the placeholder {target} and no other braces.*KeyError"),
        ("b-{0}.json", ["0.5"], r"--out may hold the placeholder {target} and no other braces.*IndexError"),
    ],
)
def test_budget_file_names_are_checked_before_any_work(
    tiny_checkpoint, tmp_path, capsys, out, targets, message
):
    from ats_vit.cli import _target_paths

    if message is None:
        paths = _target_paths(str(tmp_path / out), [float(t) for t in targets])
        assert len(set(paths)) == 2 and paths[0].endswith("b-0.5000001.json")
        return
    argv = ["calibrate", str(tiny_checkpoint), "--target", *targets, "--out", str(tmp_path / out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message.replace("{target}", r"\{target\}"), err), err
    assert "Traceback" not in err and not list(tmp_path.glob("b*"))


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tiny_checkpoint, tmp_path, capsys):
    a_file = tmp_path / "final.safetensors"
    a_file.write_bytes(b"x")
    assert main(["eval", str(tiny_checkpoint), "--out", str(a_file)]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    assert (
        main(["calibrate", str(tiny_checkpoint), "--target", "0.6", "--out", str(a_folder), "--overwrite"])
        == 2
    )
    assert f"{a_folder} is a folder; --out must name a file" in capsys.readouterr().err
    assert main(["viz", str(tiny_checkpoint), "--out", str(tmp_path / "kept")]) == 2
    assert "--out must name a .png file" in capsys.readouterr().err


def test_a_bad_argument_is_one_line_not_a_usage_dump(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["calibrate", "x.safetensors", "--target", "2"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ats-vit calibrate: error: argument --target: expected a fraction of the dense cost in (0, 1], "
        "got 2.0 (see ats-vit calibrate --help)"
    ]


def test_cache_lists_and_clears_the_latency_tables(tmp_path, monkeypatch, capsys):
    from helpers import small_vit

    from ats_vit import family_of
    from ats_vit.latency import LatencyModel

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path))
    LatencyModel(family_of(small_vit().eval()), 4, repeats=1, min_seconds=0.0, progress=False)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "1 latency tables in" in out and "ViT at batch 4 on" in out
    (tmp_path / "latency" / "junk.json").write_text('{"junk": 1}')
    assert main(["cache", "list"]) == 0
    assert "junk.json: unreadable (" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 latency tables" in capsys.readouterr().out
    assert not list((tmp_path / "latency").glob("*.json"))


def test_eval_scores_agreement_with_dense_on_unlabelled_folders(tmp_path, capsys):
    """A folder whose classes are not the model's: --no-labels reports agreement with the dense
    model (1.0 for dense itself) instead of 0% accuracy, and says so."""
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree

    data = str(image_folder_tree(tmp_path / "data", splits=("val",), size=20, mode="L"))
    from ats_vit.checkpoint import save_checkpoint
    from ats_vit.models import ModelConfig, build_model

    cfg = ModelConfig(
        image_size=16, patch_size=4, num_classes=5, channels=1, dim=16, depth=3, heads=2, dim_head=8
    )
    save_checkpoint(tmp_path / "m.safetensors", build_model(cfg), cfg)
    argv = ["eval", str(tmp_path / "m.safetensors"), "--data", data, "--keep", "0.5", "--start-layer", "1"]
    assert main([*argv, "--no-labels", "--timing-repeats", "0", "--out", str(tmp_path / "e")]) == 0
    captured = capsys.readouterr()
    assert "agreement with the dense top-1 (--no-labels)" in captured.out
    assert "warning" not in captured.err, "no advice to pass --no-labels when it was passed"
    rows = json.loads((tmp_path / "e" / "eval.json").read_text())["rows"]
    assert rows[0]["accuracy"] == 1.0 and 0.0 <= rows[1]["accuracy"] <= 1.0


@pytest.mark.distributed
def test_calibrate_under_torchrun_runs_and_writes_once(tiny_checkpoint, tmp_path):
    """Two ranks used to calibrate independently and both write the file: now rank 0 works and
    writes, the other returns at once, and the warnings print once."""
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom ats_vit.cli import main\nsys.exit(main())\n")
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree, torchrun

    data = str(image_folder_tree(tmp_path / "data", size=16, mode="L"))
    out = tmp_path / "b.json"
    argv = ["calibrate", str(tiny_checkpoint), "--data", data, "--target", "0.7", "--out", str(out)]
    result = torchrun(script, 29561, *argv)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["target"] == 0.7
    assert result.stdout.count("calibrating auto") == 1 and result.stdout.count("wrote") == 1


@pytest.mark.distributed
def test_eval_with_a_device_under_torchrun_joins_the_group(tiny_checkpoint, tmp_path):
    """--device used to keep the ranks out of the process group: each evaluated (and timed)
    every image alone. Joined, they share the images, and time nothing (timing is one
    process's)."""
    script = tmp_path / "run.py"
    script.write_text("import sys\nfrom ats_vit.cli import main\nsys.exit(main())\n")
    pytest.importorskip("torchvision")
    from helpers import image_folder_tree, torchrun

    data = str(image_folder_tree(tmp_path / "data", size=16, mode="L"))
    out = tmp_path / "e"
    argv = ["eval", str(tiny_checkpoint), "--data", data, "--device", "cpu", "--timing-repeats", "1"]
    result = torchrun(script, 29563, *argv, "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert rows[0]["images"] == 8 and result.stdout.count(" on 8 images") == 1
    assert not rows[0]["timing_images"], "the ranks formed one group (which times nothing)"
