"""The value checks every config class shares: a ValueError that names the field, its range and the value.

A module of its own so config modules that ``config.py`` re-exports (``averaging_config.py``)
can use them without an import cycle.
"""

from __future__ import annotations

import math
from typing import Any


def check_range(owner: str, name: str, value: Any, low: float, high: float,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise a ValueError naming ``owner.name`` unless ``value`` lies in the interval."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{owner}.{name} must be a finite number in {lb}{low}, {high}{hb}; got {value!r}.")


def check_int(owner: str, name: str, value: int, low: int = 1) -> None:
    """Raise a ValueError naming ``owner.name`` unless ``value`` is an integer (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}; got {value!r}.")

