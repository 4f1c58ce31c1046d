"""Progress reports and cancellation, shared by every stage so the queue can show and stop work."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    stage: str  # "describing the picture" | "captioning" | "refining" | "writing the captions from your words" | "generating"
    block: int = 0  # 1-based block being generated, 0 outside generation
    blocks: int = 0
    step: int = 0  # decode step within the block
    steps: int = 0


ProgressCallback = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    pass


class CancelToken:
    """Set from any thread; model loops call `check()` once per decode step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("The job was cancelled.")
