"""Byte sizes as people write them ("2GiB", "512MB") and as people read them."""

from __future__ import annotations

import math
import re

from autobatch.errors import InvalidInputError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float, *, name: str = "memory_budget") -> int:
    """Parse ``"2GiB"``, ``"1.5GB"``, ``"512MiB"`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise InvalidInputError(
            f"{name}={value!r} is not a size; give bytes or a string like '2GiB'"
        )
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = _PATTERN.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise InvalidInputError(
                f"{name}={value!r} does not parse as a size; write it like '2GiB', '512MB' or "
                "a number of bytes"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number):
        raise InvalidInputError(f"{name}={value!r} must be a finite size, such as '2GiB'")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise InvalidInputError(f"{name}={value!r} must be one byte or more, such as '2GiB'")
    return size


def format_bytes(size: float | None) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``."""
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"
