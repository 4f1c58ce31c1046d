"""The embedded transport: jobs run in threads of this process (the default, without MTM_BROKER_URL)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..core.progress import CancelToken, Progress
from ..jobs.job import Job, JobState
from ..jobs.runner import JobEvents, JobRunner, Outcome, Stalled, execute_watched

log = logging.getLogger(__name__)

JOB_THREAD = "mtm-job"
STALLED_MESSAGE = (
    "Job {id} made no progress for {seconds:.0f} s and was given up: the GPU stopped answering. The bot's admins can "
    "see it in its log; please try again later."
)


def stuck_job_threads() -> list[str]:
    """Job threads still alive (at exit: stuck in a call that never returns, so the process cannot join them)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(JOB_THREAD) and t.is_alive()]


class LocalRunner:
    """The embedded transport: jobs run in threads of this process, up to `capacity` at once, their MusicGen
    blocks batched together (mtm_bot.stages.batcher)."""

    keeps_running = False  # a job this process was running is interrupted when it stops

    def __init__(self, runner: JobRunner, capacity: int, stall_seconds: float = 600.0) -> None:
        self.runner = runner
        self.capacity = capacity
        self.stall_seconds = stall_seconds
        # One thread per job running at once; the default executor stays free for file and network helpers.
        self._executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix=JOB_THREAD)
        self._tokens: dict[str, CancelToken] = {}
        self._capacity_changed: Callable[[], None] = lambda: None

    async def start(self, capacity_changed: Callable[[], None]) -> None:
        self._capacity_changed = capacity_changed  # a stuck job thread takes its slot with it

    async def run(self, job: Job, events: JobEvents, *, adopt: bool = False) -> Outcome:
        """The job's outcome; a job that reports no progress (a decode step, a stage, its captions) for
        `stall_seconds` fails with a sentence at once, and its thread, stuck in a call that never returns (a
        hung GPU), keeps its slot: one job fewer at a time until the bot restarts."""
        loop = asyncio.get_running_loop()
        token = self._tokens[job.id] = CancelToken()

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(events.progress, progress)

        def captions(lines: list[str]) -> None:
            loop.call_soon_threadsafe(events.captions, lines)

        try:
            return await execute_watched(
                self._executor, self.runner.execute, job, report, token, captions, self.stall_seconds
            )
        except Stalled:
            return self._give_up(job)
        finally:
            del self._tokens[job.id]

    def _give_up(self, job: Job) -> Outcome:
        self.capacity -= 1
        log.critical(
            "Job %s made no progress for %.0f s: the thread running it is stuck (a hung GPU call?) and keeps its "
            "slot. The job fails; %d job(s) at a time from now on. Restart the bot to free the GPU.",
            job.id,
            self.stall_seconds,
            self.capacity,
        )
        self._capacity_changed()
        return Outcome(JobState.FAILED, error=STALLED_MESSAGE.format(id=job.id, seconds=self.stall_seconds))

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
