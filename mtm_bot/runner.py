"""Running one job on this process's pipeline: the embedded worker's job threads and a GPU worker process
(mtm_bot.gpu_worker) alike.

    runner = JobRunner(pipeline, files)          # files: where the job's inputs are and its outputs go
    outcome = runner.execute(job, report, cancel, captions)   # in a job thread; never raises

`execute` maps every failure to the one sentence a user reads (Outcome.error), never a traceback, and
writes the job's result files under `files` (JobFiles.result_files). `LocalRunner` is the embedded
transport: it runs jobs in threads of this process for the scheduler (mtm_bot.worker).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import metrics
from .errors import Cancelled, InputError, MTMError
from .jobs import Job, JobFiles, JobKind, JobState
from .kept import Kept
from .progress import CancelToken, Progress, ProgressCallback
from .timecode import format_range

if TYPE_CHECKING:
    from .audio import Audio
    from .pipeline import ComposeResult, Pipeline

log = logging.getLogger(__name__)

OOM_MESSAGE = ("The GPU ran out of memory on this job. Try a shorter duration or a shorter clip, "
               "or try again when the server is less busy.")
UNEXPECTED_MESSAGE = ("Something went wrong while working on job {id}; the error was logged for the "
                      "server's admins. Please try again later.")

CaptionsCallback = Callable[[list[str]], None]


class ClipMissing(InputError):
    pass


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


class JobRunner:
    def __init__(self, pipeline: "Pipeline", files: JobFiles) -> None:
        self.pipeline = pipeline
        self.files = files

    def execute(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> Outcome:
        """Run the job's entry point; Cancelled becomes a CANCELLED outcome, every error a FAILED one."""
        report = _timing_stages(report)
        try:
            result_json = self._entry_points[job.kind](self, job, report, cancel, captions)
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

    def _caption(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> dict:
        segments = self.pipeline.caption(self.pipeline.read_clip(_stored(job.input_path, "clip")), report, cancel)
        return {"input_captions": [dataclasses.asdict(s) for s in segments],
                "lines": [f"{format_range(s.start, s.end)} {s.caption}" for s in segments]}

    def _compose(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> dict:
        """From a clip, a picture, both, or the instruction alone: whichever the job stored."""
        clip = None if job.input_path is None else self.pipeline.read_clip(_stored(job.input_path, "clip"))
        image = None if job.image_path is None else _stored(job.image_path, "picture")
        result = self.pipeline.compose(clip, job.instruction, job.duration, seed=job.seed, progress=report,
                                       cancel=cancel, on_captions=captions, image=image)
        return self._keep(job, result, clip)

    def _derive(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> dict:
        """Reroll, Extend, Remix, Redo: from the parent's kept track, which the job holds links to."""
        kept = Kept.load(self.files.parent_files(job), self.pipeline.read_clip)
        result = _DERIVATIONS[job.kind](self.pipeline, job, kept, seed=job.seed, progress=report, cancel=cancel,
                                        on_captions=captions)
        return self._keep(job, result, kept.clip)

    def _keep(self, job: Job, result: ComposeResult, clip: Audio | None) -> dict:
        """Write the track and what the next job starts from; the result_json to deliver."""
        result.kept(job.instruction, clip).save(self.files.kept_files(job))
        return {**result.to_json(), "lines": result.caption_lines()}

    def _midi(self, job: Job, report: ProgressCallback, cancel: CancelToken, captions: CaptionsCallback) -> dict:
        report(Progress("transcribing the notes"))
        transcription = self.pipeline.transcribe(self.files.parent_files(job).track)
        self.files.output_path(job.id, ".mid").write_bytes(transcription.midi_bytes())
        return {"notes": len(transcription.notes), "lines": []}

    def _describe_image(self, job: Job, report: ProgressCallback, cancel: CancelToken,
                        captions: CaptionsCallback) -> dict:
        """/library image: the picture in words; delivery searches the server's library with them."""
        report(Progress("describing the picture"))
        picture = self.pipeline.describe_image(_stored(job.image_path, "picture")).strip()
        if not picture:
            raise InputError("I could not put this picture into words; please try another one.")
        return {"picture": picture, "lines": []}

    _entry_points = {JobKind.CAPTION: _caption, JobKind.COMPOSE: _compose, JobKind.LIBRARY_IMAGE: _describe_image,
                     JobKind.MIDI: _midi, JobKind.REROLL: _derive, JobKind.EXTEND: _derive,
                     JobKind.REMIX: _derive, JobKind.REDO: _derive}


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


class LocalRunner:
    """The embedded transport: jobs run in threads of this process, up to `capacity` at once, their MusicGen
    blocks batched together (mtm_bot.batcher)."""

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
