"""The `aiayn` command as a user meets it: one entry point, clean one-line errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

import aiayn
from aiayn.allocator import find
from aiayn.cli import HEAVY_COMMANDS, build_parser, main

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


def one_error_line(capsys) -> str:
    """The one line a user error prints (no traceback), without its 'aiayn: error: ' prefix."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiayn: error: "), captured.err
    return lines[0].removeprefix("aiayn: error: ")


# ---------------------------------------------------------------------------------------------
# Start-up: --help and --version without torch, the allocator's re-exec before torch
# ---------------------------------------------------------------------------------------------


def imported_modules(stderr: str) -> list[str]:
    """The modules that ``python -X importtime`` reports, in import order."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line]


def is_torch(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["translate", "--help"], ["translate"]])
def test_help_version_and_argument_errors_import_no_torch(args):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "aiayn", *args], capture_output=True,
                            text=True, timeout=60)
    modules = imported_modules(result.stderr)
    assert "aiayn.cli" in modules
    assert not [m for m in modules if is_torch(m)]
    if args == ["--version"]:
        assert result.returncode == 0 and result.stdout == f"aiayn {aiayn.__version__}\n" == "aiayn 0.1.0\n"


# Replaces os.execve: reports what the process had imported when it would re-execute, then stops.
EXEC_PROBE = """
import os, sys
def execve(path, argv, env):
    print("exec", env["LD_PRELOAD"].split()[0], [m for m in sys.modules if m == "torch" or m.startswith("torch.")])
    sys.stdout.flush()
    os._exit(0)
os.execve = execve
from aiayn.cli import main
sys.exit(main())
"""

HEAVY_ARGS = {
    "train": ["--config", "copy", "--data", "d", "--out", "o", "train.max_updates=1"],
    "translate": ["--checkpoint", "c"], "evaluate": ["--hyp", "h", "--ref", "r"],
    "attention": ["--checkpoint", "c", "--src", "a b", "--out", "o"], "demo": [], "serve": ["--checkpoint", "c"],
    "align": ["--checkpoint", "c", "--src", "s", "--tgt", "t"], "heads": ["--checkpoint", "c", "--src", "s", "--out", "o"],
    "ablate": ["--config", "copy", "--data", "d", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(HEAVY_COMMANDS))
def test_heavy_commands_reexecute_before_anything_imports_torch(command, tmp_path):
    fake = tmp_path / "libfast.so"
    fake.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AIAYN_ALLOCATOR_REEXEC")}
    env["AIAYN_ALLOCATOR"] = str(fake)
    result = subprocess.run([sys.executable, "-c", EXEC_PROBE, command, *HEAVY_ARGS[command]], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.stdout == f"exec {fake} []\n", result.stderr


def test_the_reexecuted_command_imports_torch_once(random_checkpoint, tmp_path):
    if find("auto") is None:
        pytest.skip("no tcmalloc/jemalloc here (make setup installs one with `python -m aiayn.allocator install`)")
    (tmp_path / "in.txt").write_text("a dog\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AIAYN_ALLOCATOR", "AIAYN_ALLOCATOR_REEXEC")}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "aiayn", "translate", "--checkpoint",
                             str(random_checkpoint), "--input", str(tmp_path / "in.txt"), "--max-len-b", "2"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    processes = result.stderr.split("| imported package")  # -X importtime's header, once per process
    assert len(processes) == 3  # the command, then the same command under the allocator
    assert not [m for m in imported_modules(processes[1]) if is_torch(m)]
    assert imported_modules(processes[2]).count("torch") == 1


# ---------------------------------------------------------------------------------------------
# Every option's help shows its default
# ---------------------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_help(command: str, option: str) -> str:
    """The rendered help of ``option`` in ``aiayn COMMAND --help``, on one line."""
    lines = subcommands()[command].format_help().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().split(" ")[0].split(",")[0] == option)
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("      ") or line.lstrip().startswith("-"):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("command, option, default", [
    ("prepare", "--vocab-size", "default 8000"), ("prepare", "--valid-size", "default 1000"),
    ("prepare", "--test-size", "default 1000"), ("prepare", "--max-len", "default 256"),
    ("prepare", "--max-ratio", "default 3.0"), ("translate", "--batch-size", "default 64"),
    ("translate", "--nbest", "default 1"), ("shortlist", "--frequent", "default 100"),
    ("serve", "--log-level", "default info"), ("serve", "--max-lines", "default 64"),
    *[(command, "--beam", "default: the checkpoint's recommended setting, else the paper's 4")
      for command in ("translate", "evaluate", "attention", "serve")],
    *[(command, "--alpha", "default: the checkpoint's recommended setting, else the paper's 0.6")
      for command in ("translate", "evaluate", "attention", "serve")],
    ("translate", "--max-len-a", "default: the checkpoint's recommended setting, else the paper's 1"),
    ("translate", "--max-len-b", "default: the checkpoint's recommended setting, else the paper's 50"),
])
def test_help_shows_the_default(command, option, default):
    assert default in option_help(command, option)


def test_every_option_with_a_default_shows_it():
    for command, parser in subcommands().items():
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            shown = option_help(command, action.option_strings[0])
            assert "default" in shown, f"aiayn {command} {action.option_strings[0]}: {shown}"


# ---------------------------------------------------------------------------------------------
# One-line errors for what a user can fix
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_sentence(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("a dog\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["translate", "evaluate"])
@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda' is not available: this torch build has no CUDA; use cpu"),
    ("foo", "unknown device 'foo'; use cpu or cuda (cuda:N for a GPU of several)"),
    ("cuda:int8", "int8 quantisation runs on the CPU only (device 'cuda')"),
])
def test_device_errors_are_one_line(command, device, message, random_checkpoint, one_sentence, capsys):
    import torch

    if device.startswith("cuda") and torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    options = ["--device", "cuda", "--quantize", "int8"] if device == "cuda:int8" else ["--device", device]
    files = (["--input", str(one_sentence)] if command == "translate"
             else ["--src", str(one_sentence), "--ref", str(one_sentence)])
    assert main([command, "--checkpoint", str(random_checkpoint), *files, *options]) == 2
    assert one_error_line(capsys) == message


def test_an_output_directory_that_cannot_be_made_is_one_line(random_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "--checkpoint", str(random_checkpoint), "--out", str(tmp_path / "file" / "out")]) == 2
    assert one_error_line(capsys).startswith(f"{tmp_path / 'file' / 'out'}: cannot create the output directory")


def test_an_output_file_that_cannot_be_written_is_one_line(random_checkpoint, one_sentence, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    assert main(["translate", "--checkpoint", str(random_checkpoint), "--input", str(one_sentence),
                 "--output", "/dev/full", "--force"]) == 2  # /dev/full: every write fails, as on a full disk
    assert one_error_line(capsys) == "/dev/full: cannot write: No space left on device"


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
