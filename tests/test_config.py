"""The config system (aiayn.config, aiayn.train.config): errors that say where the mistake is
(the override, or the file and its line) with the closest known key, and the shipped configs
usable by name from any directory."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aiayn import config as config_io
from aiayn.cli import main
from aiayn.errors import UserError
from aiayn.train.config import load_raw_config, resolve_config

from helpers import REPO, prepare_synthetic

SHIPPED = ["base", "big", "copy", "libreoffice-small", "multi30k", "multi30k-20min"]
PACKAGE_CONFIGS = Path(config_io.__file__).resolve().parent / "configs"


def resolve(config, overrides=()) -> None:
    resolve_config(load_raw_config(config, list(overrides)), vocab_size=45, where=str(config))


def error_of(config, overrides=()) -> UserError:
    with pytest.raises(UserError) as info:
        resolve(config, overrides)
    return info.value


# ---------------------------------------------------------------------------------------------
# A misspelt or mistyped override is blamed on the override
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.max_minuts=2", "train: unknown key 'max_minuts'; did you mean 'max_minutes'?"),
    ("model.d_modle=64", "model: unknown key 'd_modle'; did you mean 'd_model'?"),
    ("search.beem=2", "search: unknown key 'beem'; did you mean 'beam'?"),
    ("train.max_minutes=abc", "train.max_minutes: expected a number, got 'abc'"),
    ("model.n_heads=many", "model.n_heads: expected an integer, got 'many'"),
    ("search.alpha=[1]", "search.alpha: expected a number, got [1]"),
    ("model.preset=huge", "model.preset: unknown value 'huge'; known: ['base', 'big']"),
])
def test_an_override_error_names_the_override(override, message):
    error = error_of("copy", [override])
    assert str(error) == f"override {override!r}: {message}"
    assert "copy.yaml" not in str(error)


def test_a_key_with_no_close_match_lists_the_known_keys():
    error = error_of("copy", ["search.zzz=1"])
    assert str(error) == "override 'search.zzz=1': search: unknown key 'zzz'; known keys: alpha, beam, max_len_a, max_len_b"


def test_a_rejected_value_is_blamed_on_the_override_that_set_it():
    # TrainConfig's own check (average_last <= keep_last) names both fields; the override is the culprit
    error = error_of("copy", ["train.keep_last=1", "train.average_last=2"])
    assert str(error).startswith("override 'train.average_last=2': train: average_last (2) needs keep_last")
    assert str(error_of("copy", ["search.beam=0"])) == "override 'search.beam=0': search: beam must be at least 1 (got 0)"
    assert str(error_of("copy", ["model.src_vocab_size=99"])).startswith("override 'model.src_vocab_size=99': model.src")


def test_the_last_of_repeated_overrides_is_blamed():
    assert str(error_of("copy", ["train.warmup=5", "train.warmup=x"])).startswith("override 'train.warmup=x': ")


# ---------------------------------------------------------------------------------------------
# A mistake inside a YAML file is blamed on the file and its line
# ---------------------------------------------------------------------------------------------

YAML = """\
# a comment
model:
  d_model: 32
  n_heads: 2
train:
  max_updates: 10
  warmup: 5
search:
  beam: 2
"""


@pytest.mark.parametrize("line, replacement, message", [
    (6, "  max_updatez: 10", "train: unknown key 'max_updatez'; did you mean 'max_updates'?"),
    (7, "  warmup: soon", "train.warmup: expected an integer, got 'soon'"),
    (3, "  d_modl: 32", "model: unknown key 'd_modl'; did you mean 'd_model'?"),
    (4, "  n_heads: [2]", "model.n_heads: expected an integer, got [2]"),
    (9, "  beem: 2", "search: unknown key 'beem'; did you mean 'beam'?"),
    (9, "  beam: 0", "search: beam must be at least 1 (got 0)"),
    (7, "  warmup: 0", "train: warmup must be at least 1"),
    (5, "trian:", "unknown section 'trian'; did you mean 'train'? (a config has model:, train: and search:)"),
])
def test_a_file_error_names_the_file_and_line(tmp_path, line, replacement, message):
    lines = YAML.splitlines()
    lines[line - 1] = replacement
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    error = error_of(path)
    assert str(error) == f"{path}:{line}: {message}"
    assert (error.path, error.line) == (path, line)


def test_an_override_of_a_key_that_the_file_mistyped_is_blamed_on_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML.replace("warmup: 5", "warmup: soon"), encoding="utf-8")
    resolve(path, ["train.warmup=7"])  # the override replaces the file's bad value
    assert str(error_of(path, ["train.warmup=later"])).startswith("override 'train.warmup=later': ")


def test_a_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 32\n   n_heads: 2\n", encoding="utf-8")
    error = error_of(path)
    assert str(error).startswith(f"{path}:3: invalid YAML")


def test_the_cli_prints_the_override_in_one_line(tmp_path, capsys):
    data = prepare_synthetic(tmp_path / "data", "copy", "--train-size", "100", "--valid-size", "5", "--test-size", "5")
    capsys.readouterr()
    for override, blamed in (("train.max_minuts=2", "did you mean 'max_minutes'?"),
                             ("train.max_minutes=abc", "expected a number, got 'abc'")):
        assert main(["train", "--config", "copy", "--data", str(data), "--out", str(tmp_path / "run"), override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"aiayn: error: override {override!r}: train") and err.endswith(blamed + "\n")
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The shipped configs by name, from anywhere
# ---------------------------------------------------------------------------------------------


def test_shipped_configs_are_package_data():
    assert set(SHIPPED) <= set(config_io.shipped_configs())
    for name in config_io.shipped_configs():
        assert (PACKAGE_CONFIGS / f"{name}.yaml").is_file()
    # the repository's configs/ is the package's directory, so paths like configs/copy.yaml keep working
    assert (REPO / "configs").resolve() == PACKAGE_CONFIGS
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"configs/*.yaml"' in pyproject


def test_an_installed_package_carries_the_shipped_configs(tmp_path):
    """A wheel (what a non-editable install unpacks) holds every shipped config, and finds it by name."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no wheel can be built here")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src" / "aiayn", source / "src" / "aiayn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("aiayn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {f"aiayn/configs/{name}.yaml" for name in config_io.shipped_configs()} <= set(archive.namelist())
        archive.extractall(tmp_path / "site")
    found = subprocess.run([sys.executable, "-c", "from aiayn.config import find_config; print(find_config('copy'))"],
                           capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                           timeout=60)
    assert found.stdout == f"{tmp_path / 'site' / 'aiayn' / 'configs' / 'copy.yaml'}\n", found.stderr


@pytest.mark.parametrize("spec", ["copy", "copy.yaml", "configs/copy.yaml"])
def test_a_shipped_config_by_name_from_any_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_io.find_config(spec) == PACKAGE_CONFIGS / "copy.yaml"
    raw = load_raw_config(spec, ["train.max_updates=3"])
    assert raw.path == PACKAGE_CONFIGS / "copy.yaml"
    assert resolve_config(raw, vocab_size=45).train.max_updates == 3


def test_a_path_that_exists_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("copy.yaml").write_text("train:\n  max_updates: 9\n", encoding="utf-8")
    assert config_io.find_config("copy.yaml") == Path("copy.yaml")
    assert resolve_config(load_raw_config("copy.yaml", []), vocab_size=45).train.max_updates == 9
    assert config_io.find_config("copy") == PACKAGE_CONFIGS / "copy.yaml"  # not a path that exists


def test_no_such_config_lists_the_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_raw_config("libreofice-small", [])
    message = str(info.value)
    assert message.startswith("libreofice-small: no such config file; did you mean libreoffice-small?")
    assert all(name in message for name in SHIPPED)
    with pytest.raises(UserError, match="no such config file; the shipped configs"):
        load_raw_config(tmp_path / "elsewhere" / "mine.yaml", [])


def test_the_cli_finds_a_shipped_config_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the override is checked after the config was found and read: the error is about it, not the file
    assert main(["train", "--config", "copy", "--data", "nowhere", "--out", "run", "train.nonsense"]) == 2
    assert capsys.readouterr().err == "aiayn: error: override 'train.nonsense' is not of the form key=value\n"
