"""The `aiayn` command as a user meets it: one entry point, clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aiayn.cli import main

COMMANDS = ["prepare", "train", "average", "plot", "translate", "evaluate", "attention", "export", "demo"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiayn", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: aiayn " + command in capsys.readouterr().out


def test_user_errors_are_one_line_with_status_2(tmp_path):
    missing = tmp_path / "nope"
    (tmp_path / "in.txt").write_text("Hello.\n")
    result = run_cli("translate", "--checkpoint", str(missing), "--input", str(tmp_path / "in.txt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiayn: error: ") and str(missing) in lines[0]


def test_bad_config_override_names_the_problem(tmp_path):
    result = run_cli("train", "--config", str(tmp_path / "missing.yaml"), "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
