"""How times are written wherever users see them: `M:SS`, ranges `M:SS–M:SS` (ARCHITECTURE contract)."""


def format_time(seconds: float) -> str:
    """`0:00`, `0:27`, `1:30`: whole seconds, rounded."""
    whole = int(round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def format_range(start: float, end: float) -> str:
    return f"{format_time(start)}\u2013{format_time(end)}"
