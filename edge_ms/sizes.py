"""Byte counts as people read them: the unit that fits, about three significant digits."""

from __future__ import annotations

__all__ = ["human_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(n: float) -> str:
    """``1048576`` -> ``"1.00 MiB"``, ``135266304`` -> ``"129 MiB"``, ``1.5 * 2**30`` -> ``"1.50 GiB"``.

    One fixed unit would show a 1 MiB budget as "0.00 GiB" and a 32B model as "19876 MiB".
    """
    value = float(n)
    unit = 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{value:.0f} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_UNITS[unit]}"
