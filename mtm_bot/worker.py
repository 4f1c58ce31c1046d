"""The GPU worker: up to settings.max_batch jobs at once from the JobQueue, each in its own thread; their
MusicGen blocks are decoded together (mtm_bot.batcher), the other stages take one job at a time.

    worker = Worker(settings, pipeline, store, queue, listener)
    await worker.start()        # recovery first: queued/running jobs run again from their start
                                # (job.resumed=True), finished-but-undelivered jobs are delivered
                                # without recomputing; then serving, and hourly cleanup of files
                                # older than settings.retention_hours
    position = await worker.submit(job)      # see mtm_bot.jobs for the whole flow
    job = await worker.cancel(job_id, user_id, guild_id=..., is_manager=...)
    await worker.stop()         # a running job is interrupted and resumes on the next start

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
import dataclasses
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import torch

from .errors import Cancelled, InputError, MTMError
from .jobs import MAKES_TRACK, Job, JobKind, JobNotFound, JobQueue, JobState, JobStore, NotCancellable
from .kept import Kept
from .progress import CancelToken, Progress, ProgressCallback
from .settings import Settings
from .timecode import format_range

if TYPE_CHECKING:
    from .audio import Audio
    from .pipeline import ComposeResult, Pipeline

log = logging.getLogger(__name__)

OOM_MESSAGE = ("The GPU ran out of memory on this job. Try a shorter duration or a shorter clip, "
               "or try again when the server is less busy.")
UNEXPECTED_MESSAGE = ("Something went wrong while working on job {id}; the error was logged for the "
                      "server's admins. Please try again later.")


class ClipMissing(InputError):
    pass


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
    token: CancelToken
    cancelled_by_user: bool = False


class Worker:
    DELIVERY_ATTEMPTS = 3
    DELIVERY_RETRY_SECONDS = 5.0  # times the attempt number
    CLEANUP_INTERVAL_SECONDS = 3600.0
    STOP_GRACE_SECONDS = 10.0  # deliveries in flight may finish before stop() cuts them off

    def __init__(self, settings: Settings, pipeline: "Pipeline", store: JobStore, queue: JobQueue,
                 listener: JobListener) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.store = store
        self.queue = queue
        self.listener = listener
        # One thread per job running at once (settings.max_batch): their MusicGen blocks meet in the
        # generator's decode thread (mtm_bot.batcher); the default executor stays free for file and network helpers.
        self._executor = ThreadPoolExecutor(max_workers=settings.max_batch, thread_name_prefix="mtm-job")
        self._running: dict[str, _Running] = {}  # job id -> its cancel token
        self._slot_freed = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()
        self._stopping = False
        self._serve_task: asyncio.Task | None = None
        self._cleanup_task: asyncio.Task | None = None
        self._deliveries: set[asyncio.Task] = set()
        self._notifications: dict[str, set[asyncio.Task]] = {}  # job id -> listener calls in flight

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._recover()
        self._serve_task = asyncio.create_task(self._serve(), name="mtm-worker")
        self._cleanup_task = asyncio.create_task(self._clean_periodically(), name="mtm-cleanup")

    async def stop(self) -> None:
        """Stop serving. A running job is interrupted and left unfinished in the store: it resumes on the next start."""
        self._stopping = True
        for running in self._running.values():
            running.token.cancel()
        for task in (self._serve_task, self._cleanup_task):  # waiting for a job or a free slot: nothing to interrupt
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._serve_task, self._cleanup_task) if t), *self._jobs,
                             return_exceptions=True)
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=self.STOP_GRACE_SECONDS)
        for task in [*self._deliveries, *(t for tasks in self._notifications.values() for t in tasks)]:
            task.cancel()  # an undelivered job is delivered at the next start
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        self._executor.shutdown(wait=False)

    async def _recover(self) -> None:
        for job in reversed(await self.store.recent_done()):  # oldest first, so the newest weigh most
            if job.started_at is not None and job.finished_at is not None:
                self.queue.estimate.record(job, job.finished_at - job.started_at)
        for job in await self.store.unfinished():
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

    async def cancel(self, job_id: str | None, user_id: int, *, guild_id: int | None = None,
                     is_manager: bool = False) -> Job:
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
            job = self.queue.get(job_id)
            if job is None:
                stored = await self.store.get(job_id.strip().lower())
                if stored is None:
                    raise JobNotFound(f"There is no job with id {job_id.strip()[:16]!r}; /queue lists your jobs.")
                outcome = {JobState.DONE: "finished", JobState.FAILED: "failed",
                           JobState.CANCELLED: "been cancelled"}[stored.state]
                raise NotCancellable(f"Job {stored.id} has already {outcome}; there is nothing to cancel.")
        if job.user_id != user_id and not (is_manager and guild_id is not None and guild_id == job.guild_id):
            raise NotCancellable(f"Job {job.id} is someone else's; only its requester or a server manager can cancel it.")

        running = self._running.get(job.id)
        if running is not None:
            running.cancelled_by_user = True
            running.token.cancel()
            return job
        self.queue.remove(job.id)
        job.state, job.finished_at = JobState.CANCELLED, time.time()
        await self.store.update(job)
        self._deliver_soon(job)
        return job

    # Serving ------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Start the queue's next job whenever a slot is free (settings.max_batch jobs run at once)."""
        while not self._stopping:
            while len(self._running) >= self.queue.capacity:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            job = await self.queue.next()
            running = self._running[job.id] = _Running(job, CancelToken())  # no await since next(): cancel() sees it
            task = asyncio.create_task(self._run_one(running), name=f"job-{job.id}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _run_one(self, running: _Running) -> None:
        try:
            await self._run(running)
        except Exception:  # e.g. the database went away: log it, keep serving the next job
            log.exception("The worker failed around job %s", running.job.id)
            self.queue.finish(running.job)
        finally:
            del self._running[running.job.id]
            self._slot_freed.set()

    async def _run(self, running: _Running) -> None:
        job = running.job
        job.state, job.started_at, job.error = JobState.RUNNING, time.time(), None
        if job.kind in MAKES_TRACK and job.seed is None:
            job.seed = self.settings.seed if self.settings.seed is not None else random.randrange(2**31)
        await self.store.update(job)  # the seed is on disk before any model work: a resumed job sounds the same
        self._notify(job, self.listener.job_started, job)
        loop = asyncio.get_running_loop()
        try:
            job.result_json = await loop.run_in_executor(self._executor, self._compute, job, running.token, loop)
        except Cancelled:
            if self._stopping and not running.cancelled_by_user:
                self.queue.finish(job)
                log.info("Job %s interrupted by shutdown; it resumes on the next start", job.id)
                return  # still RUNNING in the store
            job.state = JobState.CANCELLED
        except torch.OutOfMemoryError:
            log.exception("Job %s ran out of GPU memory", job.id)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the next job the memory this one held
            job.state, job.error = JobState.FAILED, OOM_MESSAGE
        except InputError as err:
            log.warning("Job %s refused: %s", job.id, err)
            job.state, job.error = JobState.FAILED, str(err)
        except MTMError as err:  # ModelUnavailable, OutputTooLarge: their messages are written for users
            log.exception("Job %s failed", job.id)
            job.state, job.error = JobState.FAILED, str(err)
        except Exception:
            log.exception("Job %s failed", job.id)
            job.state, job.error = JobState.FAILED, UNEXPECTED_MESSAGE.format(id=job.id)
        else:
            job.state = JobState.DONE
            if job.kind in MAKES_TRACK:
                job.result_path = self.store.output_path(job.id)
            elif job.kind is JobKind.MIDI:
                job.result_path = self.store.output_path(job.id, ".mid")
        job.finished_at = time.time()
        self.queue.finish(job, job.finished_at - job.started_at if job.state is JobState.DONE else None)
        await self.store.update(job)
        self._deliver_soon(job)

    def _compute(self, job: Job, cancel: CancelToken, loop: asyncio.AbstractEventLoop) -> dict:
        """Runs in the model thread; returns the job's result_json."""

        def forward(method: Callable[..., Awaitable[None]], *args) -> None:
            loop.call_soon_threadsafe(self._notify, job, method, job, *args)

        def report(progress: Progress) -> None:
            forward(self.listener.job_progress, progress)

        def captions(lines: list[str]) -> None:
            forward(self.listener.job_captions, lines)

        entry_points = {JobKind.CAPTION: self._caption, JobKind.COMPOSE: self._compose,
                        JobKind.LIBRARY_IMAGE: self._describe_image, JobKind.MIDI: self._midi,
                        JobKind.REROLL: self._derive, JobKind.EXTEND: self._derive, JobKind.REMIX: self._derive,
                        JobKind.REDO: self._derive}
        result_json = entry_points[job.kind](job, report, cancel, captions)
        # The store keeps JSON text: a result that cannot be stored fails here, as this job's error.
        return json.loads(json.dumps(result_json))

    def _caption(self, job: Job, report: ProgressCallback, cancel: CancelToken,
                 captions: Callable[[list[str]], None]) -> dict:
        segments = self.pipeline.caption(self.pipeline.read_clip(_stored(job.input_path, "clip")), report, cancel)
        return {"input_captions": [dataclasses.asdict(s) for s in segments],
                "lines": [f"{format_range(s.start, s.end)} {s.caption}" for s in segments]}

    def _compose(self, job: Job, report: ProgressCallback, cancel: CancelToken,
                 captions: Callable[[list[str]], None]) -> dict:
        """From a clip, a picture, both, or the instruction alone: whichever the job stored."""
        clip = None if job.input_path is None else self.pipeline.read_clip(_stored(job.input_path, "clip"))
        image = None if job.image_path is None else _stored(job.image_path, "picture")
        result = self.pipeline.compose(clip, job.instruction, job.duration, seed=job.seed, progress=report,
                                       cancel=cancel, on_captions=captions, image=image)
        return self._keep(job, result, clip)

    def _derive(self, job: Job, report: ProgressCallback, cancel: CancelToken,
                captions: Callable[[list[str]], None]) -> dict:
        """Reroll, Extend, Remix, Redo: from the parent's kept track, which the job holds links to."""
        kept = Kept.load(self.store.parent_files(job), self.pipeline.read_clip)
        result = _DERIVATIONS[job.kind](self.pipeline, job, kept, seed=job.seed, progress=report, cancel=cancel,
                                        on_captions=captions)
        return self._keep(job, result, kept.clip)

    def _keep(self, job: Job, result: ComposeResult, clip: Audio | None) -> dict:
        """Write the track and what the next job starts from; the result_json to deliver."""
        result.kept(job.instruction, clip).save(self.store.kept_files(job))
        return {**result.to_json(), "lines": result.caption_lines()}

    def _midi(self, job: Job, report: ProgressCallback, cancel: CancelToken,
              captions: Callable[[list[str]], None]) -> dict:
        report(Progress("transcribing the notes"))
        transcription = self.pipeline.transcribe(self.store.parent_files(job).track)
        self.store.output_path(job.id, ".mid").write_bytes(transcription.midi_bytes())
        return {"notes": len(transcription.notes), "lines": []}

    def _describe_image(self, job: Job, report: ProgressCallback, cancel: CancelToken,
                        captions: Callable[[list[str]], None]) -> dict:
        """/library image: the picture in words; delivery searches the server's library with them."""
        report(Progress("describing the picture"))
        picture = self.pipeline.describe_image(_stored(job.image_path, "picture")).strip()
        if not picture:
            raise InputError("I could not put this picture into words; please try another one.")
        return {"picture": picture, "lines": []}

    # Talking to the listener ----------------------------------------------------------------------

    def _notify(self, job: Job, method: Callable[..., Awaitable[None]], *args) -> None:
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


# Each derived kind's pipeline entry point, given the job and its parent's kept track.
_DERIVATIONS = {
    JobKind.REROLL: lambda pipeline, job, kept, **run: pipeline.reroll(kept, **run),
    JobKind.EXTEND: lambda pipeline, job, kept, **run: pipeline.extend(kept, job.duration, **run),
    JobKind.REMIX: lambda pipeline, job, kept, **run: pipeline.remix(kept, job.instruction, **run),
    JobKind.REDO: lambda pipeline, job, kept, **run: pipeline.redo(kept, job.redo_from, **run),
}


def _stored(path: Path | None, what: str) -> Path:
    """An upload the job stored; refused with a sentence if it is gone (cleaned up, deleted by hand)."""
    if path is None or not path.exists():
        raise ClipMissing(f"The {what} of this job is no longer stored; please submit it again.")
    return path


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A job listener call failed", exc_info=task.exception())
