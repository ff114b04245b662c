"""The `aiayn` command as a user meets it: one entry point, clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aiayn.cli import main

from helpers import COPY_CONFIG, TINY

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


# ---------------------------------------------------------------------------------------------
# --force replaces an artefact of the kind being written, nothing else
# ---------------------------------------------------------------------------------------------

KINDS = ["foreign", "dataset", "run", "checkpoint", "export", "attention"]
HOLDS = {"dataset": "holds an aiayn dataset", "run": "holds an aiayn training run",
         "checkpoint": "holds an aiayn checkpoint", "export": "holds an aiayn Marian export",
         "attention": "holds aiayn attention pictures",
         "foreign": "is not a directory aiayn wrote (it holds notes.txt)"}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, copy_dataset, random_checkpoint) -> dict:
    """One directory of each kind aiayn writes, plus a user's directory of notes."""
    import shutil

    root = tmp_path_factory.mktemp("artefacts")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("precious")
    shutil.copytree(copy_dataset, root / "dataset")
    shutil.copytree(random_checkpoint, root / "checkpoint")
    for args in (["train", "--config", str(COPY_CONFIG), "--data", str(copy_dataset), "--out", str(root / "run"),
                  *TINY, "train.max_updates=1"],
                 ["export", "--checkpoint", str(random_checkpoint), "--out", str(root / "export")],
                 ["attention", "--checkpoint", str(random_checkpoint), "--src", "a dog",
                  "--out", str(root / "attention")]):
        assert main(args) == 0
    return {kind: root / kind for kind in KINDS}


def writers(copy_dataset, checkpoint) -> dict:
    """The command line that writes each kind of directory into OUT."""
    return {
        "dataset": ["prepare", "--corpus", "copy", "--train-size", "100", "--valid-size", "5", "--test-size", "5"],
        "run": ["train", "--config", str(COPY_CONFIG), "--data", str(copy_dataset), *TINY, "train.max_updates=1"],
        "checkpoint": ["average", str(checkpoint)],
        "export": ["export", "--checkpoint", str(checkpoint)],
        "attention": ["attention", "--checkpoint", str(checkpoint), "--src", "a dog"],
    }


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["dataset", "run", "checkpoint", "export", "attention"])
def test_force_replaces_only_an_artefact_of_the_same_kind(kind, artefacts, copy_dataset, random_checkpoint, tmp_path,
                                                          capsys):
    import shutil

    args = writers(copy_dataset, random_checkpoint)[kind] + ["--force"]
    for existing in KINDS:
        out = tmp_path / existing
        shutil.copytree(artefacts[existing], out, symlinks=True)
        before = snapshot(out)
        code = main(args + ["--out", str(out)])
        err = capsys.readouterr().err
        if existing == kind:
            assert code == 0, err
            continue
        assert code == 2
        line, = err.splitlines()
        wanted = HOLDS[kind].removeprefix("holds ")
        assert line.startswith(f"aiayn: error: {out}: {HOLDS[existing]}; --force replaces only {wanted}:")
        assert snapshot(out) == before


def test_resume_continues_only_a_run(artefacts, copy_dataset, tmp_path, capsys):
    import shutil

    out = tmp_path / "data"
    shutil.copytree(artefacts["dataset"], out)
    before = snapshot(out)
    assert main(writers(copy_dataset, None)["run"] + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: cannot resume: holds an aiayn dataset; --resume continues an aiayn training run" in err
    assert snapshot(out) == before
