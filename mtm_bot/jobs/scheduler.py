"""The job scheduler: runs up to the runner's capacity of jobs at once, in the queue's fair order, and
delivers their outcomes. How the bot uses it (mtm_bot.jobs.store, mtm_bot.jobs.queue):

    store = await JobStore.open(settings)
    queue = JobQueue(settings)
    scheduler = Scheduler(settings, runner, store, queue, listener)
    await scheduler.start()     # recovery first: queued/running jobs run again from their start
                                # (job.resumed=True), finished-but-undelivered jobs are delivered
                                # without recomputing; then serving, and hourly cleanup of files
                                # older than settings.retention_hours

    queue.check(user_id)                       # QueueFull / TooManyJobs before downloading anything
    job = Job.new(JobKind.COMPOSE, user_id=..., guild_id=..., channel_id=..., instruction=...,
                  duration=pipeline.output_duration(clip, requested),  # resolved seconds: better ETAs
                  attachment_size_limit=..., application_id=..., interaction_token=...)
    job.input_path = await store.save_input(job.id, data, attachment.filename)
    clip = await asyncio.to_thread(pipeline.read_clip, job.input_path)   # on InputError:
                                               #   await store.delete_files(job.id)
    position = await scheduler.submit(job)     # 1 = next to run; QueueFull / TooManyJobs
    job = await scheduler.cancel(job_id_or_None, user_id, guild_id=..., is_manager=...)   # /cancel: the job
                                               #   comes back CANCELLED if it was queued, still RUNNING if it
                                               #   was running (it stops at its next decode step)
    await scheduler.stop()      # a running job is interrupted and resumes on the next start

The runner is the transport that runs a job and streams its events back: `LocalRunner`
(mtm_bot.jobs.runner: threads of this process, the embedded default) or `RemoteRunner` (mtm_bot.transport.distributed:
GPU worker processes through taskiq + Redis; their jobs keep running while the bot restarts, and the
bot takes them up again). The store, fairness, limits, ETA and delivery stay here for both.

The listener (the bot's delivery cog) implements JobListener; every call runs on the event loop, never
in the model thread: keep heavy work (encoding a track) off the loop with asyncio.to_thread. Progress
is forwarded as it comes (about once per decode step): throttle in the listener. A job's outcome is
delivered once: `delivered` is set only after job_finished / job_failed / job_cancelled returned
without raising; a delivery that raises is retried a few times and again at the next start. (A crash
in the moment between the listener returning and that one SQLite commit would deliver it again.)
Failures reach the user as a one-sentence message (job.error), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ..core import metrics
from ..core.errors import InputError
from ..core.progress import Progress
from ..core.seeds import choose_seed
from ..core.settings import Settings
from .job import Job, JobState
from .kinds import MAKES_TRACK
from .queue import JobQueue
from .runner import UNEXPECTED_MESSAGE, JobEvents, Runner
from .store import JobStore

log = logging.getLogger(__name__)


class JobNotFound(InputError):
    pass


class NotCancellable(InputError):
    """The job exists but has already finished, or belongs to someone else."""


class JobListener(Protocol):
    async def job_started(self, job: Job) -> None: ...

    async def job_progress(self, job: Job, progress: Progress) -> None: ...

    async def job_captions(self, job: Job, lines: list[str]) -> None:
        """The refined captions (`M:SS–M:SS caption`, one per output block), before generation starts."""

    async def job_finished(self, job: Job) -> None:
        """job.result_json["lines"] holds the caption lines; compose jobs have job.result_path (WAV)."""

    async def job_failed(self, job: Job, message: str) -> None: ...

    async def job_cancelled(self, job: Job) -> None: ...


@dataclass
class _Running:
    job: Job
    cancelled_by_user: bool = False


class Scheduler:
    DELIVERY_ATTEMPTS = 3
    DELIVERY_RETRY_SECONDS = 5.0  # times the attempt number
    CLEANUP_INTERVAL_SECONDS = 3600.0
    STOP_GRACE_SECONDS = 10.0  # deliveries in flight may finish before stop() cuts them off

    def __init__(
        self, settings: Settings, runner: Runner, store: JobStore, queue: JobQueue, listener: JobListener
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.store = store
        self.queue = queue
        self.listener = listener
        self._running: dict[str, _Running] = {}  # job id -> the job and who stopped it
        self._slot_freed = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()
        self._stopping = False
        self._serve_task: asyncio.Task | None = None
        self._cleanup_task: asyncio.Task | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._notifications: dict[str, set[asyncio.Task]] = {}  # job id -> listener calls in flight
        metrics.QUEUE_LENGTH.set_function(lambda: len(self.queue))
        metrics.JOBS.labels("queued").set_function(lambda: len(self.queue))
        metrics.JOBS.labels("running").set_function(lambda: len(self._running))

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover()
        await self.runner.start(self._capacity_changed)
        self._capacity_changed()
        self._serve_task = asyncio.create_task(self._serve(), name="mtm-scheduler")
        self._cleanup_task = asyncio.create_task(self._clean_periodically(), name="mtm-cleanup")

    async def stop(self) -> None:
        """Stop serving. A job this process runs is interrupted and left unfinished in the store: it resumes on
        the next start. A job on a GPU worker (distributed mode) runs on and is taken up at the next start."""
        self._stopping = True
        self.runner.interrupt()
        for task in (self._serve_task, self._cleanup_task):  # waiting for a job or a free slot: nothing to interrupt
            if task is not None:
                task.cancel()
        if self.runner.keeps_running:
            for task in self._jobs:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._serve_task, self._cleanup_task) if t), *self._jobs, return_exceptions=True
        )
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=self.STOP_GRACE_SECONDS)
        for task in [*self._deliveries, *(t for tasks in self._notifications.values() for t in tasks)]:
            task.cancel()  # an undelivered job is delivered at the next start
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self.runner.close()

    async def _recover(self) -> None:
        for job in reversed(await self.store.recent_done()):  # oldest first, so the newest weigh most
            if job.started_at is not None and job.finished_at is not None:
                self.queue.estimate.record(job, job.finished_at - job.started_at)
        for job in await self.store.unfinished():
            if job.state is JobState.RUNNING and self.runner.keeps_running:
                log.info("Taking up job %s, handed to a GPU worker before the restart", job.id)
                self.queue.adopt(job)
                self._start(job, adopt=True)
                continue
            job.state, job.started_at, job.resumed = JobState.QUEUED, None, True
            await self.store.update(job)
            self.queue.restore(job)
            log.info("Resuming job %s after a restart", job.id)
        for job in await self.store.undelivered():
            self._deliver_soon(job)

    # Requests from the bot ------------------------------------------------------------------------

    async def submit(self, job: Job) -> int:
        """Persist and enqueue a job whose clip is already saved (store.save_input).

        Returns its 1-based queue position (1 = next to run). When the limits refuse it (QueueFull,
        TooManyJobs) nothing of the job is kept, its stored clip included.
        """
        try:
            self.queue.check(job.user_id)
            await self.store.add(job)
            return self.queue.submit(job)  # checks again: another submission may have come in meanwhile
        except InputError:
            await self.store.delete(job.id)
            raise

    async def cancel(
        self, job_id: str | None, user_id: int, *, guild_id: int | None = None, is_manager: bool = False
    ) -> Job:
        """/cancel: `job_id` None means the user's newest unfinished job.

        Only the requester, or a manager of the server the job came from, may cancel. A queued job is
        removed at once (returned with state CANCELLED); a running job is returned still RUNNING and
        stops at its next decode step. Either way listener.job_cancelled follows.
        Raises JobNotFound / NotCancellable (InputErrors) with a message for the user.
        """
        if job_id is None:
            mine = self.queue.unfinished_of(user_id)
            if not mine:
                raise JobNotFound("You have no queued or running job to cancel.")
            job = max(mine, key=lambda j: j.created_at)
        else:
            queued = self.queue.get(job_id)
            if queued is None:
                stored = await self.store.get(job_id.strip().lower())
                if stored is None:
                    raise JobNotFound(f"There is no job with id {job_id.strip()[:16]!r}; /queue lists your jobs.")
                outcome = {JobState.DONE: "finished", JobState.FAILED: "failed", JobState.CANCELLED: "been cancelled"}[
                    stored.state
                ]
                raise NotCancellable(f"Job {stored.id} has already {outcome}; there is nothing to cancel.")
            job = queued
        if job.user_id != user_id and not (is_manager and guild_id is not None and guild_id == job.guild_id):
            raise NotCancellable(
                f"Job {job.id} is someone else's; only its requester or a server manager can cancel it."
            )

        running = self._running.get(job.id)
        if running is not None:
            running.cancelled_by_user = True
            self.runner.cancel(job.id)
            return job
        self.queue.remove(job.id)
        job.state, job.finished_at = JobState.CANCELLED, time.time()
        await self.store.update(job)
        self._deliver_soon(job)
        return job

    # Serving ------------------------------------------------------------------------------------

    def _capacity_changed(self) -> None:
        self.queue.capacity = self.runner.capacity  # the ETA counts the live slots
        self._slot_freed.set()

    async def _serve(self) -> None:
        """Start the queue's next job whenever the runner has a free slot: a job is handed out only then, so
        the queue's round-robin alone decides the order."""
        while not self._stopping:
            while len(self._running) >= self.runner.capacity:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            job = await self.queue.next()
            self._start(job)

    def _start(self, job: Job, *, adopt: bool = False) -> None:
        running = self._running[job.id] = _Running(job)  # no await since queue.next(): cancel() sees it
        task = asyncio.create_task(self._run_one(running, adopt), name=f"job-{job.id}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _run_one(self, running: _Running, adopt: bool) -> None:
        try:
            await self._run(running, adopt)
        except Exception:  # e.g. the database went away: log it, tell the user, keep serving the next job
            log.exception("The scheduler failed around job %s", running.job.id)
            self.queue.finish(running.job)
            if running.job.state is JobState.RUNNING:
                await self._fail_unexpectedly(running.job)
        finally:
            del self._running[running.job.id]
            self._slot_freed.set()

    async def _run(self, running: _Running, adopt: bool) -> None:
        job = running.job
        if not adopt:
            job.state, job.started_at, job.error = JobState.RUNNING, time.time(), None
            if job.kind in MAKES_TRACK and job.seed is None:
                job.seed = choose_seed(self.settings.seed, job.id if job.parent_id is not None else None)
            await self.store.update(job)  # the seed is on disk before any model work: a resumed job sounds the same
            self._notify(job, self.listener.job_started, job)
        events = JobEvents(
            progress=lambda progress: self._notify(job, self.listener.job_progress, job, progress),
            captions=lambda lines: self._notify(job, self.listener.job_captions, job, lines),
        )
        outcome = await self.runner.run(job, events, adopt=adopt)
        if outcome.state is JobState.CANCELLED and self._stopping and not running.cancelled_by_user:
            self.queue.finish(job)
            log.info("Job %s interrupted by shutdown; it resumes on the next start", job.id)
            return  # still RUNNING in the store
        job.state, job.error, job.result_json = outcome.state, outcome.error, outcome.result_json
        if job.state is JobState.DONE:
            job.result_path = next(iter(self.store.result_files(job).values()), None)
        job.finished_at = time.time()
        ran = job.finished_at - job.started_at if job.state is JobState.DONE and job.started_at is not None else None
        self.queue.finish(job, ran)
        # A compose job's further takes become finished jobs of their own before the job is stored done: a
        # restart in between runs the job again, and its takes are recorded (and delivered) once.
        takes = await self.store.record_takes(job) if job.state is JobState.DONE else []
        await self.store.update(job)
        await self.runner.settled(job)
        metrics.JOBS_FINISHED.labels(job.state.value).inc()
        self._deliver_soon(job)
        for take in takes:
            self._deliver_soon(take)

    async def _fail_unexpectedly(self, job: Job) -> None:
        """A job the scheduler broke on fails with a sentence, rather than waiting in silence for the next start
        (where it would run again); if even that cannot be stored, it does wait for the next start."""
        job.state, job.error, job.finished_at = JobState.FAILED, UNEXPECTED_MESSAGE.format(id=job.id), time.time()
        try:
            await self.store.update(job)
        except Exception:
            log.exception("Job %s could not be marked failed either; it runs again at the next start", job.id)
            return
        metrics.JOBS_FINISHED.labels(job.state.value).inc()
        self._deliver_soon(job)

    # Talking to the listener ----------------------------------------------------------------------

    def _notify(self, job: Job, method: Callable[..., Coroutine[Any, Any, None]], *args) -> None:
        """Call a listener method in its own task; its errors are logged, the job goes on."""
        task = asyncio.create_task(method(*args))
        pending = self._notifications.setdefault(job.id, set())
        pending.add(task)
        task.add_done_callback(pending.discard)
        task.add_done_callback(_log_failure)

    def _deliver_soon(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver(job), name=f"deliver-{job.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, job: Job) -> None:
        # Progress edits still in flight land before the result, never after it.
        await asyncio.gather(*self._notifications.pop(job.id, ()), return_exceptions=True)
        for attempt in range(1, self.DELIVERY_ATTEMPTS + 1):
            try:
                if job.state is JobState.DONE:
                    await self.listener.job_finished(job)
                elif job.state is JobState.FAILED:
                    await self.listener.job_failed(job, job.error or UNEXPECTED_MESSAGE.format(id=job.id))
                else:
                    await self.listener.job_cancelled(job)
            except Exception:
                log.exception("Delivering job %s failed (attempt %d of %d)", job.id, attempt, self.DELIVERY_ATTEMPTS)
                if attempt < self.DELIVERY_ATTEMPTS:
                    await asyncio.sleep(self.DELIVERY_RETRY_SECONDS * attempt)
                continue
            job.delivered = True
            await self.store.mark_delivered(job.id)
            return
        log.error("Job %s stays undelivered; delivery is tried again at the next start", job.id)

    async def _clean_periodically(self) -> None:
        while True:
            try:
                deleted = await self.store.cleanup(time.time() - self.settings.retention_hours * 3600)
                if deleted:
                    log.info("Deleted %d files older than %g hours", deleted, self.settings.retention_hours)
            except Exception:
                log.exception("Cleaning up old job files failed")
            await asyncio.sleep(self.CLEANUP_INTERVAL_SECONDS)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A job listener call failed", exc_info=task.exception())
