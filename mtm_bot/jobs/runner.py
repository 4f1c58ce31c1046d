"""Running one job on this process's pipeline: the embedded default's job threads and a GPU worker process
(mtm_bot.transport.gpu_worker) alike.

    runner = JobRunner(pipeline, files)          # files: where the job's inputs are and its outputs go
    outcome = runner.execute(job, report, cancel, captions)   # in a job thread; never raises

`execute` maps every failure to the one sentence a user reads (Outcome.error), never a traceback, and
writes the job's result files under `files` (its kind's `writes`, mtm_bot.jobs.kinds). `Runner` is what the
scheduler (mtm_bot.jobs.scheduler) asks of a transport: mtm_bot.transport.local (threads of this process) and
mtm_bot.transport.distributed (GPU workers over Redis).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..core import metrics
from ..core.errors import Cancelled, InputError, MTMError
from ..core.progress import CancelToken, Progress, ProgressCallback
from .job import Job, JobState
from .kinds import KINDS, CaptionsCallback, Run
from .store import JobFiles

if TYPE_CHECKING:
    from ..stages.pipeline import Pipeline

log = logging.getLogger(__name__)
T = TypeVar("T")

OOM_MESSAGE = (
    "The GPU ran out of memory on this job. Try a shorter duration or a shorter clip, "
    "or try again when the server is less busy."
)
UNEXPECTED_MESSAGE = (
    "Something went wrong while working on job {id}; the error was logged for the "
    "server's admins. Please try again later."
)


@dataclass(frozen=True)
class Outcome:
    state: JobState  # DONE, FAILED or CANCELLED
    result_json: dict | None = None  # DONE: what delivery posts ("lines", ...)
    error: str | None = None  # FAILED: the sentence the user reads


@dataclass(frozen=True)
class JobEvents:
    """What a running job reports, called on the event loop (throttling is the listener's business)."""

    progress: Callable[[Progress], None]
    captions: CaptionsCallback  # the refined caption lines, before generation starts


class Runner(Protocol):
    """A transport that runs jobs and streams their events back (LocalRunner below,
    mtm_bot.transport.distributed.RemoteRunner); the scheduler (mtm_bot.jobs.scheduler) drives it."""

    @property
    def capacity(self) -> int:  # read-only: RemoteRunner's is a property
        """Jobs it can run at once now (the live GPU workers' slots in distributed mode)."""

    keeps_running: bool  # its jobs go on while this process restarts (then `run(adopt=True)` takes them up)

    async def start(self, capacity_changed: Callable[[], None]) -> None: ...

    async def run(self, job: Job, events: JobEvents, *, adopt: bool = False) -> Outcome:
        """Run the job (or, adopting, await the run already under way) to its outcome."""

    async def settled(self, job: Job) -> None:
        """The outcome is stored: let go of what carried it."""

    def cancel(self, job_id: str) -> None:
        """Stop a running job at its next decode step (run then returns a CANCELLED outcome)."""

    def where(self, job_id: str) -> str | None:
        """The GPU worker running the job; None in this process."""

    def workers(self) -> list: ...

    def interrupt(self) -> None:
        """Shutdown of this process: its own jobs stop at their next step."""

    async def close(self) -> None: ...


class JobRunner:
    def __init__(self, pipeline: Pipeline, files: JobFiles) -> None:
        self.pipeline = pipeline
        self.files = files

    def execute(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> Outcome:
        """Run the job's entry point (mtm_bot.jobs.kinds); Cancelled becomes a CANCELLED outcome, every error a FAILED one."""
        report = _timing_stages(report)
        try:
            result_json = KINDS[job.kind].run(Run(self.pipeline, job, self.files, report, cancel, captions))
            # The store keeps JSON text: a result that cannot be stored fails here, as this job's error.
            return Outcome(JobState.DONE, json.loads(json.dumps(result_json)))
        except Cancelled:
            return Outcome(JobState.CANCELLED)
        except InputError as err:
            log.warning("Job %s refused: %s", job.id, err)
            return Outcome(JobState.FAILED, error=str(err))
        except MTMError as err:  # ModelUnavailable, OutputTooLarge: their messages are written for users
            log.exception("Job %s failed", job.id)
            return Outcome(JobState.FAILED, error=str(err))
        except Exception as err:
            import torch

            if isinstance(err, torch.OutOfMemoryError):
                log.exception("Job %s ran out of GPU memory", job.id)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the next job the memory this one held
                return Outcome(JobState.FAILED, error=OOM_MESSAGE)
            log.exception("Job %s failed", job.id)
            return Outcome(JobState.FAILED, error=UNEXPECTED_MESSAGE.format(id=job.id))
        finally:
            report(Progress("done"))  # closes the last stage's timing


class Stalled(Exception):
    """A job reported no progress for its stall limit: the thread running it is stuck in a call that never
    returns (a hung GPU), and is left behind."""


async def execute_watched(
    executor: Executor,
    execute: Callable[[Job, ProgressCallback, CancelToken, CaptionsCallback], Outcome],
    job: Job,
    report: ProgressCallback,
    cancel: CancelToken,
    captions: CaptionsCallback,
    stall_seconds: float,
) -> Outcome:
    """`execute` (JobRunner.execute) in a thread of `executor`, awaited on the caller's loop; raises Stalled,
    leaving the thread behind, once neither `report` nor `captions` has been called for `stall_seconds`."""
    heard = time.monotonic()

    def noted(callback: Callable[[T], None]) -> Callable[[T], None]:
        def call(value: T) -> None:  # in the job thread
            nonlocal heard
            heard = time.monotonic()
            callback(value)

        return call

    loop = asyncio.get_running_loop()
    running = loop.run_in_executor(executor, execute, job, noted(report), cancel, noted(captions))
    while not (await asyncio.wait([running], timeout=min(stall_seconds / 4, 5.0)))[0]:
        if time.monotonic() - heard > stall_seconds:
            raise Stalled(f"Job {job.id} made no progress for {stall_seconds:.0f} s")
    return running.result()


def _timing_stages(report: ProgressCallback) -> ProgressCallback:
    """Pass progress on, and time each stage for the metrics endpoint (mtm_stage_seconds)."""
    current: list = [None, time.monotonic()]  # stage, when it began

    def timed(progress: Progress) -> None:
        if progress.stage != current[0]:
            now = time.monotonic()
            if current[0] is not None:
                metrics.STAGE_SECONDS.labels(current[0]).observe(now - current[1])
            current[:] = progress.stage, now
        if progress.stage != "done":
            report(progress)

    return timed
