"""The valid values of one numeric recipe field (`Range`): bounds, a set of values, list lengths, words.

Torch-free and free of recipes: `distill.config` declares one `Range` per numeric field in its
``RANGES`` table and checks a recipe against it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric recipe field (every value must also be a finite number; ``null`` is valid
    exactly when the field is Optional).

    ``lo``/``hi``: bounds (``hi=None``: unbounded above), excluded when ``lo_open``/``hi_open``. ``values``: the
    only valid values, instead of bounds. ``lengths``: for a list field, its valid numbers of values; the bounds apply
    to each. ``fix``: how to fix a bad value (default: ``e.g. <the default>``).
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    values: tuple = ()
    lengths: tuple = ()
    fix: str = ""
    words: tuple = ()  # strings valid besides the numbers (num_workers: auto)

    def contains(self, x: Any) -> bool:
        """Whether one number ``x`` is valid (finite, within the bounds or one of ``values``)."""
        if isinstance(x, str):
            return x in self.words
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        if self.values:
            return x in self.values
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def describe(self) -> str:
        """``'>= 1'``, ``'> 0'``, ``'in (0, 1]'``, ``'1 or 3'``: the valid values of one number."""
        if self.words:
            return " or ".join([*map(repr, self.words), dataclasses.replace(self, words=()).describe()])
        if self.values:
            return " or ".join(map(str, self.values))
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
