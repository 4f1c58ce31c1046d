"""The embedded transport: jobs run in threads of this process (the default, without MTM_BROKER_URL)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..core.progress import CancelToken, Progress
from ..jobs.job import Job
from ..jobs.runner import JobEvents, JobRunner, Outcome


class LocalRunner:
    """The embedded transport: jobs run in threads of this process, up to `capacity` at once, their MusicGen
    blocks batched together (mtm_bot.stages.batcher)."""

    keeps_running = False  # a job this process was running is interrupted when it stops

    def __init__(self, runner: JobRunner, capacity: int) -> None:
        self.runner = runner
        self.capacity = capacity
        # One thread per job running at once; the default executor stays free for file and network helpers.
        self._executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="mtm-job")
        self._tokens: dict[str, CancelToken] = {}

    async def start(self, capacity_changed: Callable[[], None]) -> None:
        pass  # the capacity never changes

    async def run(self, job: Job, events: JobEvents, *, adopt: bool = False) -> Outcome:
        loop = asyncio.get_running_loop()
        token = self._tokens[job.id] = CancelToken()

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(events.progress, progress)

        def captions(lines: list[str]) -> None:
            loop.call_soon_threadsafe(events.captions, lines)

        try:
            return await loop.run_in_executor(self._executor, self.runner.execute, job, report, token, captions)
        finally:
            del self._tokens[job.id]

    async def settled(self, job: Job) -> None:
        pass  # nothing to acknowledge: the store is the only record

    def cancel(self, job_id: str) -> None:
        if job_id in self._tokens:
            self._tokens[job_id].cancel()

    def where(self, job_id: str) -> str | None:
        return None  # this process

    def workers(self) -> list:
        return []

    def interrupt(self) -> None:
        """Shutdown: the running jobs stop at their next step (and run again at the next start)."""
        for token in self._tokens.values():
            token.cancel()

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
