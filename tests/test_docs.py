"""The README and the docs as a user meets them: every Python block runs as written, every
`ats-vit` command line parses, the README is short and the CI runs its test command.

Python blocks run page by page, each page's blocks in order in one namespace (as a reader would
paste them), in a folder that holds what the pages name: `imagenet/train` and `imagenet/val`
(random images), `runs/demo/final.safetensors` (an untrained demo model) and its budgets. No
download happens: `timm.create_model(..., pretrained=True)` builds random weights, and
`from_pretrained` a small model of the same class. What a block prints is not checked; that it
runs is.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(page: Path, language: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(page.read_text()) if m.group(1) == language]


def commands(page: Path) -> list[list[str]]:
    """Every `ats-vit ...` or `python -m ats_vit.cli ...` command in the page's bash blocks."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part)
                if words[:1] == ["ats-vit"]:
                    found.append(words[1:])
                elif words[:4] == ["torchrun", "--nproc_per_node", "2", "-m"] and words[4:5] == [
                    "ats_vit.cli"
                ]:
                    found.append(words[5:])
    return found


def test_the_readme_is_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for history in (r"\bissue \d+", r"\bround \d+", r"\bsession\b", r"\brev\. ?\d+"):
        assert not re.search(history, text, re.I), f"development history in the README: {history}"
    assert "docs/" in text and "CHANGELOG.md" in text


def test_ci_runs_exactly_the_readmes_test_command():
    readme = blocks(ROOT / "README.md", "bash")[0]
    test_command = next(line for line in readme.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.strip() in ci.splitlines()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_parses(page):
    from ats_vit.cli import build_parser

    parser = build_parser()
    for argv in commands(page):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `ats-vit {' '.join(argv)}` does not parse")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A folder with what the pages name, and no network."""
    pytest.importorskip("timm")
    import timm
    from helpers import image_folder_tree

    from ats_vit.budget import Budget
    from ats_vit.checkpoint import save_checkpoint
    from ats_vit.models import ModelConfig, build_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    image_folder_tree(tmp_path / "imagenet", per_class=2, size=32)
    cfg = ModelConfig()
    save_checkpoint(tmp_path / "runs" / "demo" / "final.safetensors", build_model(cfg), cfg)
    for target in (0.4, 0.5):
        budget = Budget(2, (18, 13, 9, 6, 4, 3), dropped="fuse", depth=8, num_patches=36, target=target)
        budget.save(tmp_path / f"budget-{target}.json")

    real = timm.create_model

    def no_download(name, pretrained=False, **kwargs):
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    transformers = pytest.importorskip("transformers")
    from helpers import HF_TINY

    def small(cls, name, *args, **kwargs):
        config = transformers.ViTConfig(
            **{**HF_TINY, "image_size": 224, "patch_size": 16, "num_hidden_layers": 4}
        )
        return transformers.ViTForImageClassification(config)

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", classmethod(small))
    return tmp_path


RUNNABLE = [page for page in PAGES if blocks(page, "python")]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_written(page, world):
    namespace: dict[str, object] = {"__name__": "__docs__"}
    torch.manual_seed(0)
    for i, code in enumerate(blocks(page, "python")):
        try:
            exec(compile(code, f"{page.name}[python block {i}]", "exec"), namespace)
        except Exception as exc:  # name the page and block, keep the cause
            raise AssertionError(f"{page.relative_to(ROOT)}: python block {i} failed: {exc!r}") from exc
