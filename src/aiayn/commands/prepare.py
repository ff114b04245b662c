"""``aiayn prepare``: flags -> `PrepareOptions` -> `aiayn.data.prepare`."""

from __future__ import annotations

import dataclasses


def run(args) -> int:
    from ..data.prepare import PrepareOptions, prepare_dataset

    fields = {f.name for f in dataclasses.fields(PrepareOptions)}
    prepare_dataset(PrepareOptions(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0
