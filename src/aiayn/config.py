"""One config system for the whole project: typed dataclasses, read from and written to YAML.

Every concern keeps its settings in one ``@dataclass``: ``TransformerConfig`` in `aiayn.model`,
``TrainConfig`` in `aiayn.train.config`, and ``SearchConfig`` here (the search settings are
shared by the search, the translator, the server, validation during training and the
checkpoint's recommended settings; they live here so the command line can show their defaults
without importing torch). This module turns such dataclasses into plain dicts and back, checks
field names and types, and applies ``key=value`` overrides from the command line. Unknown keys
are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError

T = TypeVar("T")


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


def check_choice(value: Any, choices, where: str) -> None:
    """A `UserError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{where}: unknown value {value!r}; known: {sorted(choices)}")


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
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError("no such config file", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", path=path, line=line) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("expected a mapping at the top level", path=path)
    return data


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML.

    ``model.d_model=256`` sets ``data['model']['d_model'] = 256``; ``train.lr_factor=2.0``
    likewise. The dataclass check in `from_dict` catches misspelt keys afterwards.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data
