"""One thread per model for the models that take one job at a time (the LLM, the image captioner)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from ..core.errors import Cancelled
from ..core.progress import CancelToken

POLL_SECONDS = 0.05  # how often a call waiting for the model's thread looks at its cancel token
T = TypeVar("T")


class ModelThread:
    """Every call to one model runs on one thread of its own, its load and warm-up included: torch keeps
    CUDA graph trees per thread, so a step captured at warm-up would be recorded again on the first call
    from every other (job) thread. Calls run one at a time, in order; a call whose job is cancelled while
    it waits leaves at once. The thread ends when this object is freed."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[[], T], cancel: CancelToken | None = None) -> T:
        future = self._executor.submit(fn)
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                if cancel is not None and cancel.cancelled and future.cancel():  # it had not started
                    raise Cancelled("The job was cancelled.") from None
