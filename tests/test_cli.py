import subprocess
import sys

import pytest

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
