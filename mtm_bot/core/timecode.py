"""How times are written wherever users see them, and read back from them: `M:SS`, ranges `M:SS–M:SS`
(a contract: docs/ARCHITECTURE.md)."""

import re

from .errors import InputError


def format_time(seconds: float) -> str:
    """`0:00`, `0:27`, `1:30`: whole seconds, rounded."""
    whole = int(round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def format_range(start: float, end: float) -> str:
    return f"{format_time(start)}\u2013{format_time(end)}"


_TIME = re.compile(r"(?P<minutes>[0-9]+):(?P<seconds>[0-5][0-9])|(?P<plain>[0-9]+(?:\.[0-9]+)?)")


def parse_time(text: str) -> float:
    """`1:30` or `90` (also `90.5`) as seconds; InputError for anything else."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise InputError(f"{text!r} is not a time; write it as M:SS (1:30) or in seconds (90).")
    if match["plain"] is not None:
        return float(match["plain"])
    return float(int(match["minutes"]) * 60 + int(match["seconds"]))
