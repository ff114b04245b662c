"""One config system for the whole project: typed dataclasses, read from and written to YAML.

Every concern keeps its settings in one ``@dataclass``: ``TransformerConfig`` in `aiayn.model`,
``TrainConfig`` in `aiayn.train.config`, and ``SearchConfig`` here (the search settings are
shared by the search, the translator, the server, validation during training and the
checkpoint's recommended settings; they live here so the command line can show their defaults
without importing torch). This module turns such dataclasses into plain dicts and back, checks
field names and types, and applies ``key=value`` overrides from the command line. Unknown keys
are errors, never silently ignored.

Errors say where the mistake is. `load_yaml` and `apply_overrides` return a `ConfigDict`, which
remembers where each section and key came from (an `Origin`: a file's line, or an override);
`from_dict` raises a `ConfigKeyError` that names the key paths it is about, and `blame` turns it
into ``FILE:LINE: message`` or ``override 'train.warmup=x': message``, with the closest known key
for a misspelt one. The configs shipped with aiayn (``aiayn/configs/*.yaml``, package data) can
be given by name from any directory: `find_config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


# The arithmetic a command runs in (`aiayn.precision`): auto is bf16 where the device does bf16
# natively, else fp32. Here, without torch, so that the CLI can offer the choices.
PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a translation is searched: the paper's §6.1 settings by default.

    "we used beam search with a beam size of 4 and length penalty α = 0.6 ... We set the
    maximum output length during inference to input length + 50." ``beam=1`` is greedy search.
    The length penalty is GNMT's, lp(Y) = ((5 + |Y|) / 6) ** α (`aiayn.search`); the maximum
    output length is floor(max_len_a · |x| + max_len_b) subwords before the EOS.
    """

    beam: int = 4
    alpha: float = 0.6
    max_len_a: float = 1.0
    max_len_b: int = 50

    def check(self) -> SearchConfig:
        """Raise a `UserError` for a setting out of range; returns self."""
        if self.beam < 1:
            raise UserError(f"beam must be at least 1 (got {self.beam})")
        if self.alpha < 0:
            raise UserError(f"alpha must not be negative (got {self.alpha})")
        if self.max_len_a < 0 or self.max_len_b < 0:
            raise UserError(f"the maximum length a·|x| + b needs a, b >= 0 (got {self.max_len_a}, {self.max_len_b})")
        return self

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with the settings in ``changes`` that are not None replaced."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Where a setting came from, and errors that say so
# ---------------------------------------------------------------------------------------------

KeyPath = tuple[str, ...]  # ('train', 'max_updates'): a key in its section


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a config value came from: a line of a YAML file, or a command-line override."""

    path: Path | None = None
    line: int | None = None
    override: str | None = None  # the override's text, 'train.max_updates=100'


class ConfigDict(dict):
    """A config mapping that remembers the origin of each section and key (`origins`, keyed by
    key path) and the file it was read from (`path`, None for a mapping built in Python)."""

    def __init__(self, data: dict | None = None, origins: dict[KeyPath, Origin] | None = None,
                 path: Path | None = None) -> None:
        super().__init__(data or {})
        self.origins: dict[KeyPath, Origin] = dict(origins or {})
        self.path = path

    def origin(self, keys: KeyPath) -> Origin | None:
        """The origin of ``keys``, else of its nearest enclosing section that has one."""
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.origins:
                return self.origins[keys[:n]]
        return None


class ConfigKeyError(UserError):
    """A config mistake about particular keys (``paths``: the key paths the message names, the
    likeliest culprit first); `blame` says which file line or override set them."""

    def __init__(self, message: str, paths: Sequence[KeyPath] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(paths)


def _key_path(where: str, *keys: str) -> KeyPath:
    return (*where.split("."), *keys) if where else tuple(keys)


def unknown_key_message(key: str, known, what: str = "key") -> str:
    """"unknown key 'warmpu'; did you mean 'warmup'?", or the list of known keys when none is close."""
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} {key!r}; did you mean {close[0]!r}?"
    return f"unknown {what} {key!r}; known {what}s: {', '.join(known)}"


def blame(error: ConfigKeyError, raw: dict, fallback: str | Path | None = None) -> UserError:
    """``error`` as a `UserError` that names where the offending setting came from: the override
    that set it (``override 'train.warmup=x': ...``), or the file and line (``FILE:LINE: ...``).
    Of the keys the error names, one set by an override is blamed first. Without a known origin,
    the error names ``fallback`` (a file or a label), if given."""
    origin = None
    if isinstance(raw, ConfigDict):
        exact = [raw.origins[p] for p in error.paths if p in raw.origins]
        origin = next((o for o in exact if o.override is not None), exact[0] if exact else None)
        if origin is None:  # a key that came from no file or override: the section that holds it
            origin = next((o for o in map(raw.origin, error.paths) if o is not None), None)
    message = str(error)
    if origin is not None and origin.override is not None:
        return UserError(f"override {origin.override!r}: {message}")
    if origin is not None:
        return UserError(message, path=origin.path, line=origin.line)
    path = raw.path if isinstance(raw, ConfigDict) and raw.path is not None else fallback
    return UserError(message, path=path)


@contextlib.contextmanager
def blamed(raw: dict, fallback: str | Path | None = None) -> Iterator[None]:
    """``with blamed(raw):`` a `ConfigKeyError` raised inside becomes `blame`'s UserError."""
    try:
        yield
    except ConfigKeyError as e:
        raise blame(e, raw, fallback) from None


def mentioned_fields(message: str, names) -> list[str]:
    """The field ``names`` that ``message`` mentions, in the order it mentions them."""
    found = []
    for name in names:
        match = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)
        if match:
            found.append((match.start(), name))
    return [name for _, name in sorted(found)]


def check_choice(value: Any, choices, where: str) -> None:
    """A `UserError` unless ``value`` is one of ``choices`` (``where``: the key, 'model.preset')."""
    if value not in choices:
        section, _, key = where.rpartition(".")
        raise ConfigKeyError(f"{where}: unknown value {value!r}; known: {sorted(choices)}", [_key_path(section, key)])


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as a plain dict of YAML-safe values."""
    return dataclasses.asdict(obj)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) one value against a field's type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, where) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-9" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values.

    Errors are `ConfigKeyError`s that start with ``where`` (the section, 'train') and name the
    key paths (``where.key``) they are about, so that `blame` can say where each was set."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigKeyError(f"{where}: {unknown_key_message(key, names)}", [_key_path(where, str(key))])
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _coerce(v, hints[k], f"{where}.{k}")
        except ConfigKeyError:
            raise
        except UserError as e:
            raise ConfigKeyError(str(e), [_key_path(where, k)]) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        # a check in __post_init__: blame the fields the message names
        paths = [_key_path(where, k) for k in mentioned_fields(str(e), names)]
        raise ConfigKeyError(f"{where}: {e}", paths or [_key_path(where)]) from None


def _positions(node: yaml.Node, path: Path, prefix: KeyPath, origins: dict[KeyPath, Origin]) -> None:
    """The line of every mapping key under ``node``, by key path."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            keys = (*prefix, key_node.value)
            origins[keys] = Origin(path=path, line=key_node.start_mark.line + 1)
            _positions(value_node, path, keys, origins)


def load_yaml(path: str | Path) -> ConfigDict:
    """Read a YAML mapping, with errors that name the file and line; the result remembers the
    line of each key (`ConfigDict`), for the errors of `from_dict` (see `blame`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("no such config file", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path, line=line) from None
    finally:
        loader.dispose()
    if data is None:
        return ConfigDict(path=path)
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", path=path, line=node.start_mark.line + 1)
    origins: dict[KeyPath, Origin] = {}
    _positions(node, path, (), origins)
    return ConfigDict(data, origins, path)


# ---------------------------------------------------------------------------------------------
# The configs shipped with aiayn
# ---------------------------------------------------------------------------------------------

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data (the repository's configs/ links here)


def shipped_configs() -> list[str]:
    """The names of the configs shipped with aiayn: 'base', 'copy', ..."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []


def find_config(spec: str | Path) -> Path:
    """The config file ``spec`` names: a path that exists, else a shipped config by name
    ('libreoffice-small' or 'libreoffice-small.yaml'; 'configs/NAME.yaml', as the docs write it,
    from any directory). Otherwise a `UserError` that lists the shipped names."""
    path = Path(spec)
    if path.exists():
        return path
    names = shipped_configs()
    stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
    if str(path.parent) in (".", "configs") and stem in names:
        return CONFIGS_DIR / f"{stem}.yaml"
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6) if str(path.parent) in (".", "configs") else []
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"no such config file; {hint}the shipped configs, usable by name from any directory: "
                    f"{', '.join(names)}", path=path)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> ConfigDict:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML.

    ``model.d_model=256`` sets ``data['model']['d_model'] = 256``; ``train.lr_factor=2.0``
    likewise. The dataclass check in `from_dict` catches misspelt keys afterwards; the result
    remembers which override set each key (`ConfigDict`), for its errors.
    """
    origins = dict(data.origins) if isinstance(data, ConfigDict) else {}
    path = data.path if isinstance(data, ConfigDict) else None
    data = ConfigDict({k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}, origins, path)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = tuple(key.strip().split("."))
        node = data
        for n, part in enumerate(parts[:-1], 1):
            if part not in node:
                data.origins[parts[:n]] = Origin(override=item)
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
        data.origins[parts] = Origin(override=item)
        for inner in [k for k in data.origins if k[:len(parts)] == parts and len(k) > len(parts)]:
            del data.origins[inner]  # the keys of a mapping it replaced
    return data
