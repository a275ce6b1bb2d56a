"""Attention specs written as text: `name[@sparsity][:key=value]...` (a backend, its options, a
sparsity / top-k and a tile), as `scripts/compare_patterns.py` and `python -m vsa.scaling.recall`
take them on the command line.

    parse_pattern("grat_b:radius=2x1x1")   # PatternSpec(name="grat_b", options={"radius": (2, 1, 1)})
    parse_pattern("vsa@0.875")             # sparsity 0.875
    parse_pattern("sta:tile=4x8x8")        # another tile
"""

from __future__ import annotations

import dataclasses
import re

from vsa.attention import BACKENDS
from vsa.layout import int_triple

Triple = tuple[int, int, int]


@dataclasses.dataclass
class PatternSpec:
    """One row of the comparison: a backend, its options, the VSA sparsity / top-k, the tile."""

    label: str
    name: str
    options: dict = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    topk: int | None = None
    tile: Triple | None = None  # None: the checkpoint's tile


def parse_tile(value) -> Triple:
    """A tile of 3 positive ints from "4x8x8", "4,8,8" or a sequence of 3 ints."""
    parts = value
    if isinstance(value, str):
        parts = [int(p) if p.strip().isdigit() else p for p in re.split(r"[x,]", value.strip().lower())]
    try:
        return int_triple("tile", parts)
    except (TypeError, ValueError):
        raise ValueError(f"tile must be 3 positive ints (t, h, w), e.g. 4x8x8, got {value!r}") from None


def _option_value(key: str, text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        if "x" in low or "," in low:
            return tuple(int(p) for p in re.split(r"[x,]", low))
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise ValueError(f"option {key}={text!r}: expected an int, 3 ints (e.g. 1x1x1), a float, "
                         "true or false") from None


def parse_pattern(text: str, tile=None) -> PatternSpec:
    """Read a pattern spec `name[@sparsity][:key=value]...`.

    Examples: "full", "grat_b", "grat_b:radius=2x1x1", "grat_x:lines=true", "sta:window=3x5x5",
    "vsa@0.875", "vsa:topk=8", "grat_b:tile=4x8x8". `tile` (a per-spec `tile=` wins) is the tile
    for this pattern; None keeps the checkpoint's. Other keys are the backend's options.
    """
    head, *pairs = text.strip().split(":")
    name, _, sparsity = head.partition("@")
    name = name.strip()
    if name not in BACKENDS:
        raise ValueError(f"pattern {text!r}: unknown attention {name!r}; known: {sorted(BACKENDS)} "
                         "(spec: name[@sparsity][:key=value]..., e.g. vsa@0.875 or grat_b:radius=1)")
    spec = PatternSpec(label=text.strip(), name=name,
                       tile=None if tile is None else parse_tile(tile))
    try:
        if sparsity:
            spec.sparsity = float(sparsity)
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ValueError(f"options are written key=value (e.g. radius=1x1x1), got {pair!r}")
            if key == "tile":
                spec.tile = parse_tile(value)
            elif key == "sparsity":
                spec.sparsity = float(value)
            elif key == "topk":
                spec.topk = int(value)
            else:
                spec.options[key] = _option_value(key, value)
    except ValueError as err:
        raise ValueError(f"pattern {text!r}: {err}") from None
    if not BACKENDS[name].needs_sparsity and (spec.sparsity is not None or spec.topk is not None):
        takers = " / ".join(n for n, backend in BACKENDS.items() if backend.needs_sparsity)
        raise ValueError(f"pattern {text!r}: a sparsity / topk applies to {takers} only (the static "
                         "patterns fix their tiles; full attention keeps all)")
    return spec
