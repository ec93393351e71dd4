import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_cfg, tiny_data, torchrun, weights
from torch.utils.data import TensorDataset

from ats_vit.checkpoint import CheckpointError, load_checkpoint, load_model
from ats_vit.evaluate import evaluate
from ats_vit.models import ModelConfig
from ats_vit.train import train


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_train_writes_checkpoints_and_metrics(tmp_path):
    final = train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    assert final.exists() and (tmp_path / "last.safetensors").exists()
    rows = list(csv_rows(tmp_path / "metrics.csv"))
    assert rows and rows[-1]["step"] == "12"
    model, cfg = load_model(final)
    assert cfg == TINY
    result = evaluate(model, tiny_data(48, seed=1))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["images"] == 48 and len(result["kept_per_layer"]) == 3


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


def test_resume_refuses_a_run_of_another_config(tmp_path):
    from ats_vit.train import RunExistsError

    train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    other = tiny_cfg(tmp_path)
    other.model = ModelConfig(**{**TINY.__dict__, "dim": 24})
    with pytest.raises(RunExistsError, match=r"was configured with model=.*'dim': 16.*\(asked .*'dim': 24"):
        train(other, tiny_data(), resume=True, progress=False)
    (tmp_path / "config.json").unlink()  # without the run's config, the checkpoint still says so
    with pytest.raises(CheckpointError, match="was trained with"):
        train(other, tiny_data(), resume=True, progress=False)


def test_resume_with_nothing_to_resume_refuses_and_names_what_is_there(tmp_path):
    """A finished run without its last.safetensors: 0.x started afresh and replaced the final
    checkpoint, the config and half the metrics. Nothing may change."""
    from ats_vit.train import RunExistsError

    train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    (tmp_path / "last.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(
        RunExistsError,
        match=r"nothing to resume in .*: it holds config.json, metrics.csv, epochs.csv, final.safetensors",
    ):
        train(tiny_cfg(tmp_path), tiny_data(), resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with pytest.raises(RunExistsError, match=r"nothing to resume in .*: it holds no last.safetensors"):
        train(tiny_cfg(tmp_path / "empty"), tiny_data(), resume=True, progress=False)


def test_a_resume_keeps_the_runs_own_settings(tmp_path):
    from ats_vit.train import RunExistsError

    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path), CrashingData(tiny_data(), limit=16 * 7 + 5), progress=False)
    longer = tiny_cfg(tmp_path)
    longer.epochs = 3
    with pytest.raises(RunExistsError, match=r"configured with epochs=2 \(asked 3\)"):
        train(longer, tiny_data(), resume=True, progress=False)
    sparser = tiny_cfg(tmp_path)
    sparser.ckpt_every = 6  # how often checkpoints are written may change
    train(sparser, tiny_data(), resume=True, progress=False)


def test_training_labels_the_head_cannot_score_are_refused_before_anything_is_written(tmp_path):
    images, labels = tiny_data().tensors
    labels = labels.clone()
    labels[5] = TINY.num_classes  # one class too many, as a folder with an extra sub-folder
    with pytest.raises(ValueError, match=r"1 of the 96 training labels lie outside \[0, 3\)"):
        train(tiny_cfg(tmp_path / "run"), TensorDataset(images, labels), progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_interrupted_rewrite_of_the_metrics_leaves_them_whole(tmp_path, monkeypatch):
    import csv

    from ats_vit.train import _drop_metrics_after

    log = tmp_path / "metrics.csv"
    text = "step,epoch,lr,loss,time\n20,0,1,2,3\n40,0,1,2,3\n6"  # the last row cut short
    log.write_text(text)

    class Interrupted:
        def __init__(self, *_):
            pass

        def writerows(self, rows):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(csv, "writer", Interrupted)
        with pytest.raises(KeyboardInterrupt):
            _drop_metrics_after(log, 40)
    assert log.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    _drop_metrics_after(log, 40)
    assert [r["step"] for r in csv_rows(log)] == ["20", "40"], "the row cut short is dropped"


@pytest.mark.distributed
def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers import tiny_cfg, tiny_data
        from ats_vit.train import train
        import torch.distributed as dist
        torch.set_num_threads(1)
        train(tiny_cfg(__import__("pathlib").Path({str(tmp_path / "ddp")!r})), tiny_data(), progress=False)
        rank = dist.get_rank()
        # one write per process: print() writes its pieces apart, and two ranks interleave them
        sys.stdout.write(f"rank {{rank}} world {{dist.get_world_size()}}\\n")
        sys.stdout.flush()
        dist.destroy_process_group()
    """)
    )
    run = torchrun(script, 29517)
    assert "world 2" in run.stdout
    final = tmp_path / "ddp" / "final.safetensors"
    assert final.exists()
    # each process saw half the data per step: 96 / 2 / 16 = 3 steps per epoch, 2 epochs
    assert int(load_checkpoint(tmp_path / "ddp" / "last.safetensors")[2]["train.step"]) == 6


@pytest.mark.parametrize("arch", ["timm", "timm-gap", "timm-map"])
def test_timm_architecture_trains_and_samples(tmp_path, arch):
    pytest.importorskip("timm")
    from ats_vit import family_of
    from ats_vit.viz import save_kept_tokens_grid

    cfg = tiny_cfg(tmp_path)
    cfg.model = ModelConfig(**{**TINY.__dict__, "arch": arch})
    final = train(cfg, tiny_data(), progress=False)
    model, loaded = load_model(final)
    assert loaded.arch == arch and type(model).__name__ == "VisionTransformer"
    assert family_of(model).scoring == ("cls" if arch == "timm" else "received")
    from ats_vit.budget import Budget

    sampled = Budget(1, (4, 4)).apply(model)
    images = tiny_data(3).tensors[0]
    with torch.no_grad():
        trace = family_of(sampled.eval()).run(images)[1].trace
    assert trace.kept_per_layer()[:, -1].max() <= 4
    assert save_kept_tokens_grid(images, trace, 4, tmp_path / "timm.png").exists()


def test_timm_architecture_needs_matching_head_sizes():
    pytest.importorskip("timm")
    from ats_vit.models import build_model

    with pytest.raises(ValueError, match="dim_head \\* heads == dim"):
        build_model(ModelConfig(**{**TINY.__dict__, "arch": "timm", "dim_head": 4}))
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model(ModelConfig(**{**TINY.__dict__, "arch": "keras"}))


def test_the_cli_offers_every_architecture():
    from ats_vit.cli import build_parser
    from ats_vit.models import ARCHS

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    (arch,) = [a for a in train_parser._actions if a.dest == "arch"]
    assert tuple(arch.choices) == ARCHS


ATS_BUDGET = dict(start_layer=1, caps=(8, 4), dropped="fuse", temperature=2.0)


def ats_cfg(out: Path, **kw):
    from dataclasses import replace

    from ats_vit.budget import Budget

    cfg = tiny_cfg(out, **kw)
    cfg.model = replace(TINY, budget=Budget(**ATS_BUDGET).to_dict())
    return cfg


def test_training_with_a_budget_keeps_it_in_the_checkpoint(tmp_path):
    from ats_vit.budget import Budget

    final = train(ats_cfg(tmp_path), tiny_data(), progress=False)
    model, cfg = load_model(final)
    assert Budget.from_dict(cfg.budget) == Budget(**ATS_BUDGET)
    assert model.max_tokens_per_depth == (16, 8, 4) and model.options.dropped == "fuse"
    result = evaluate(model, tiny_data(32, seed=1))
    assert result["kept_per_layer"][-1] <= 4 + 1  # the fused token comes on top of the cap


def test_resume_with_a_budget_gives_the_same_final_weights(tmp_path):
    """The jittered sample points come from the saved RNG state, so a resumed ATS run matches."""
    data = tiny_data()
    reference = train(ats_cfg(tmp_path / "straight"), data, progress=False)
    interrupted = tmp_path / "killed"
    with pytest.raises(Crash):
        train(ats_cfg(interrupted), CrashingData(data, limit=16 * 7 + 5), progress=False)
    resumed = train(ats_cfg(interrupted), data, resume=True, progress=False)
    a, b = weights(reference), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetuning_starts_from_the_checkpoint_and_refuses_other_sizes(tmp_path, tiny_checkpoint):
    from dataclasses import replace

    cfg = ats_cfg(tmp_path / "ft")
    cfg.init_from, cfg.epochs, cfg.lr = str(tiny_checkpoint), 1, 0.0  # lr 0: the weights stay
    final = train(cfg, tiny_data(), progress=False)
    start, tuned = weights(tiny_checkpoint), weights(final)
    assert all(torch.equal(start[k], tuned[k]) for k in start)
    other = ats_cfg(tmp_path / "other")
    other.model, other.init_from = replace(other.model, dim=24), str(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="not a model of the sizes to train"):
        train(other, tiny_data(), progress=False)


@pytest.mark.distributed
@pytest.mark.parametrize("budget", [False, True], ids=["dense", "ats"])
def test_ddp_trains_the_same_model_as_one_process(tmp_path, budget):
    """2 processes with batch B end with the weights of 1 process with batch 2B over the same
    sample order (ATS with the sample points not jittered)."""
    make = "ats_cfg" if budget else "tiny_cfg"
    script = tmp_path / "ddp_same.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers import tiny_cfg, tiny_data
        from test_train import ats_cfg
        from ats_vit.distributed import finish
        from ats_vit.train import train
        torch.set_num_threads(1)
        cfg = {make}(__import__("pathlib").Path(sys.argv[1]), jitter=False)
        cfg.batch_size = int(sys.argv[2])
        train(cfg, tiny_data(), progress=False)
        finish()
    """)
    )
    torchrun(script, 29521 + budget, str(tmp_path / "two"), "8")
    one = (ats_cfg if budget else tiny_cfg)(tmp_path / "one", jitter=False)
    one.batch_size = 16
    train(one, tiny_data(), progress=False)
    a, b = weights(tmp_path / "one" / "final.safetensors"), weights(tmp_path / "two" / "final.safetensors")
    # the ranks' all-reduced mean and one process's mean round differently, and AVX2 and
    # AVX-512 kernels differently again (1.85e-5 seen after 12 AdamW steps); 1e-4 holds on both
    worst = max(a, key=lambda k: (a[k] - b[k]).abs().max().item())
    diff = (a[worst] - b[worst]).abs().max().item()
    assert diff <= 1e-4, f"largest difference {diff:.2e} in {worst} (allowed 1e-4)"


def test_a_run_folder_is_never_written_over(tmp_path):
    from ats_vit.train import RunExistsError

    old = weights(train(tiny_cfg(tmp_path), tiny_data(), progress=False))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(
        RunExistsError, match=r"already holds a run \(config.json, metrics.csv, epochs.csv, last.safetensors"
    ):
        train(tiny_cfg(tmp_path), tiny_data(), progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    again = tiny_cfg(tmp_path)
    again.seed = 1
    train(again, tiny_data(), progress=False, overwrite=True)
    rows = list(csv_rows(tmp_path / "metrics.csv"))
    assert [r["step"] for r in rows] == ["12"], "the old run's metrics are gone, not appended to"
    assert [r["step"] for r in csv_rows(tmp_path / "epochs.csv")] == ["6", "12"]
    new = weights(tmp_path / "final.safetensors")
    assert not all(torch.equal(old[k], new[k]) for k in old), "a new run, from another seed"


def test_the_checkpoint_being_finetuned_is_never_an_output(tmp_path, tiny_checkpoint):
    cfg = ats_cfg(tiny_checkpoint.parent)
    cfg.init_from = str(tiny_checkpoint)
    before = tiny_checkpoint.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is a file this run would write"):
            train(cfg, tiny_data(), progress=False, overwrite=overwrite)
    assert tiny_checkpoint.read_bytes() == before


class Interrupting(CrashingData):
    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except Crash:
            raise KeyboardInterrupt from None


def test_ctrl_c_names_the_last_checkpoint_and_resume_says_where_it_starts(tmp_path, capsys):
    from ats_vit.train import TrainingInterrupted

    data = tiny_data()
    with pytest.raises(
        TrainingInterrupted,
        match=r"stopped at step 7 of 12; the last checkpoint is .*last.safetensors \(step 4\)",
    ):
        train(tiny_cfg(tmp_path), Interrupting(data, limit=16 * 7 + 5), progress=False)
    train(tiny_cfg(tmp_path), data, resume=True, progress=False)
    assert f"resume: {tmp_path / 'last.safetensors'} at step 4 of 12" in capsys.readouterr().err


def test_resuming_forgets_metrics_logged_after_the_checkpoint(tmp_path):
    from ats_vit.train import _drop_metrics_after

    log = tmp_path / "metrics.csv"
    log.write_text("step,epoch,lr,loss,time\n20,0,1,2,3\n40,0,1,2,3\n60,1,1,2,3\n")
    _drop_metrics_after(log, 40)
    assert [r["step"] for r in csv_rows(log)] == ["20", "40"]


def test_every_epoch_logs_its_mean_loss_and_validation_without_changing_the_training(tmp_path):
    data, val = tiny_data(), tiny_data(48, seed=1)
    plain = train(tiny_cfg(tmp_path / "plain"), data, progress=False)
    logged = train(tiny_cfg(tmp_path / "logged"), data, progress=False, val_data=val)
    a, b = weights(plain), weights(logged)
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring draws nothing from the run's RNG
    rows = list(csv_rows(tmp_path / "logged" / "epochs.csv"))
    assert [(r["step"], r["epoch"]) for r in rows] == [("6", "0"), ("12", "1")]
    model, _ = load_model(logged)
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(evaluate(model, val)["accuracy"], abs=1e-5)
    without = list(csv_rows(tmp_path / "plain" / "epochs.csv"))
    assert [r["val_accuracy"] for r in without] == ["", ""]
    assert [r["train_loss"] for r in without] == [r["train_loss"] for r in rows]
    logged_losses = [float(r["loss"]) for r in csv_rows(tmp_path / "plain" / "metrics.csv")]
    assert float(rows[0]["train_loss"]) > float(rows[1]["train_loss"]) > 0 and logged_losses
    # killed after the first epoch's row, before its next checkpoint: resumed, the same rows
    killed = tmp_path / "killed"
    with pytest.raises(Crash):
        train(tiny_cfg(killed), CrashingData(data, limit=16 * 7 + 5), progress=False, val_data=val)
    train(tiny_cfg(killed), data, resume=True, progress=False, val_data=val)
    again = list(csv_rows(killed / "epochs.csv"))
    keys = ("step", "train_loss", "val_accuracy")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]
    # killed inside an epoch after a checkpoint (step 4 of 6): its loss sum comes back with it
    inside = tmp_path / "inside"
    with pytest.raises(Crash):
        train(tiny_cfg(inside), CrashingData(data, limit=16 * 5 + 3), progress=False)
    train(tiny_cfg(inside), data, resume=True, progress=False)
    assert [r["train_loss"] for r in csv_rows(inside / "epochs.csv")] == [r["train_loss"] for r in without]
