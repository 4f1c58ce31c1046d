"""Compiling the decode steps is an optimisation, never a point of failure (setting MTM_COMPILE).

`auto` compiles and captures on CUDA at start-up; if that fails (a compiler or driver bug, a CUDA
graph that cannot be captured), the stage logs one warning and runs eager, and the bot serves.
`on` compiles on any device and a failure stops the start-up; `off` never compiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class CompilePlan:
    enabled: bool  # compile the decode step (on CUDA: one captured CUDA graph per step)
    required: bool  # a failure at warm-up is an error instead of a fallback to eager

    @classmethod
    def from_setting(cls, setting: str, device: torch.device) -> CompilePlan:
        if setting not in SETTINGS:
            raise ValueError(f"MTM_COMPILE must be one of {', '.join(SETTINGS)}, not {setting!r}")
        if setting == "auto":
            return cls(enabled=device.type == "cuda", required=False)
        return cls(enabled=setting == "on", required=setting == "on")


EAGER = CompilePlan(enabled=False, required=False)


def warm_up_or_run_eager(
    stage: str, plan: CompilePlan, warm_up: Callable[[], None], run_eager: Callable[[], None]
) -> bool:
    """Compile and capture `stage` now (warm_up); on failure, unless the plan requires compiling, log one
    warning and switch the stage to eager (run_eager). Returns whether the stage runs compiled."""
    if not plan.enabled:
        return False
    try:
        warm_up()
        return True
    except Exception as err:
        if plan.required:
            raise
        log.warning(
            "compiling %s failed (%s); it runs eager (slower, same output). Set MTM_COMPILE=off to skip the attempt.",
            stage,
            _root_cause(err),
        )
        run_eager()
        return False


def _root_cause(err: BaseException) -> str:
    """`Type: first line` of the innermost cause (torch wraps a backend's error in its own)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'no message'}"
