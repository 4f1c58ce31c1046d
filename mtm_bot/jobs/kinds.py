"""Every job kind, declared once: what it runs, reads, writes and shows.

`KINDS[kind]` is the one place that says, for a kind of job, its pipeline entry point, the files it reads
(by role) and writes (by suffix) — which are also what travels through Redis to a GPU worker — its name
for users, how its result is rendered, whether it makes a track and whether it builds on a parent track.
The scheduler, the runners, the distributed transport, delivery (cogs) and the CLI read this table.

Adding a kind: a `JobKind` member (mtm_bot.jobs.job), a `KindSpec` row here, a cog control that submits it,
and, for a new way of showing a result, a `Rendering` member with its renderer in cogs.delivery.
Rendering is data here: mtm_bot never imports discord.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InputError
from ..core.progress import CancelToken, Progress, ProgressCallback
from ..core.settings import MAX_TAKES
from ..core.timecode import format_range
from ..stages.checkpoints import Stage
from ..stages.kept import Kept, KeptFiles
from ..stages.pipeline import check_extension
from .job import Job, JobKind

if TYPE_CHECKING:
    from ..core.audio import Audio
    from ..stages.pipeline import ComposeResult, Pipeline
    from .store import JobFiles

CaptionsCallback = Callable[[list[str]], None]


class Rendering(StrEnum):
    """How delivery shows a finished job (cogs.delivery maps each to its Discord renderer)."""

    TRACK = "track"  # public: the track, its refined captions and the controls that build on it; pings the requester
    CAPTIONS = "captions"  # public: the clip's caption lines; pings the requester
    MIDI_FILE = "midi_file"  # the requester alone: the MIDI file of the parent's notes
    PICTURE_SEARCH = "picture_search"  # the requester alone: the server's tracks closest to the picture's words


class Role(StrEnum):
    """What an input file is to a job; its name in an order and in Redis."""

    CLIP = "clip"
    IMAGE = "image"
    PARENT_TRACK = "parent_track"
    PARENT_STATE = "parent_state"


# Result files, by suffix under outputs/<id>: the first one is job.result_path.
TRACK_FILES = (".wav", ".kept.npz")  # the track and what the next job starts from (mtm_bot.stages.kept)
MIDI_FILES = (".mid",)


def take_files(take: int) -> tuple[str, str]:
    """Take 2, 3, …'s track and kept state, written beside the compose job's own (they travel through Redis
    with it) until the scheduler gives the take its own job (JobStore.record_take)."""
    track, state = TRACK_FILES
    return f".take{take}{track}", f".take{take}{state}"


@dataclass(frozen=True)
class Request:
    """What a job asks of its parent's track beyond the kind: from a Job, or from the CLI's arguments."""

    instruction: str
    duration: int | None  # Extend: seconds to add
    redo_from: float | None  # Redo: the output second the regenerated part starts at (a job stores whole ones)
    captions: tuple[str, ...] | None = None  # Edit captions: one per block of the parent's track

    @classmethod
    def of(cls, job: Job) -> Request:
        return cls(job.instruction, job.duration, job.redo_from, None if job.captions is None else tuple(job.captions))


@dataclass(frozen=True)
class Run:
    """One run of a job's entry point: the pipeline, the job, where its files are, and what it reports."""

    pipeline: Pipeline
    job: Job
    files: JobFiles
    progress: ProgressCallback
    cancel: CancelToken
    on_captions: CaptionsCallback


# (pipeline, the parent's kept track, the request, seed=, progress=, cancel=, on_captions=) -> the new track
Derivation = Callable[..., "ComposeResult"]


@dataclass(frozen=True)
class KindSpec:
    name: str  # what users read ("Extend job `ab12cd34`")
    run: Callable[[Run], dict]  # the entry point: writes `writes` under the job's files, returns its result_json
    reads: frozenset[Role]  # the inputs it may have (a clip or a picture only where the job stored one)
    writes: tuple[str, ...]  # result files by suffix
    rendering: Rendering
    # The model stages its entry point may load (the offline weight check asks for these): a kept
    # track's captions spare the captioner, its refinement the LLM.
    loads: tuple[Stage, ...] = ()
    private: bool = False  # its status and result go to the requester alone (ephemeral)
    derivation: Derivation | None = None  # a track made from a parent's kept track: the pipeline call (CLI too)
    origin: str | None = None  # a derived kind: what its result came from, e.g. "extended from job `{parent}`"
    # A derived kind: the seconds of music it generates (for ETAs), from the parent's length and the request;
    # raises InputError for a request that cannot fit.
    generates: Callable[[int, Request, int], int | None] | None = None

    @property
    def makes_track(self) -> bool:
        """Its result is a track, with a kept state that the next job can start from."""
        return self.rendering is Rendering.TRACK

    @property
    def derived(self) -> bool:
        return Role.PARENT_TRACK in self.reads


# Entry points ------------------------------------------------------------------------------------


class ClipMissing(InputError):
    pass


def _stored(path: Path | None, what: str) -> Path:
    """An upload the job stored; refused with a sentence if it is gone (cleaned up, deleted by hand)."""
    if path is None or not path.exists():
        raise ClipMissing(f"The {what} of this job is no longer stored; please submit it again.")
    return path


def _keep(run: Run, result: ComposeResult, clip: Audio | None) -> dict:
    """Write the track and what the next job starts from; the result_json to deliver."""
    result.kept(run.job.instruction, clip).save(run.files.kept_files(run.job))
    return {**result.to_json(), "lines": result.caption_lines()}


def _caption(run: Run) -> dict:
    segments = run.pipeline.caption(
        run.pipeline.read_clip(_stored(run.job.input_path, "clip")), run.progress, run.cancel
    )
    return {
        "input_captions": [dataclasses.asdict(s) for s in segments],
        "lines": [f"{format_range(s.start, s.end)} {s.caption}" for s in segments],
    }


def _compose(run: Run) -> dict:
    """From a clip, a picture, both, or the instruction alone: whichever the job stored."""
    job, pipeline = run.job, run.pipeline
    clip = None if job.input_path is None else pipeline.read_clip(_stored(job.input_path, "clip"))
    image = None if job.image_path is None else _stored(job.image_path, "picture")
    result = pipeline.compose(
        clip,
        job.instruction,
        job.duration,
        seed=job.seed,
        progress=run.progress,
        cancel=run.cancel,
        on_captions=run.on_captions,
        image=image,
        takes=job.takes,
    )
    delivered = _keep(run, result, clip)
    if job.takes > 1:  # each further take: its files beside the job's, its result for its own job (take_id)
        delivered["take"] = [1, job.takes]
        delivered["takes"] = []
        for number, take in enumerate(result.more_takes, 2):
            track, state = (run.files.output_path(job.id, suffix) for suffix in take_files(number))
            take.kept(job.instruction, clip).save(KeptFiles(track, state, job.input_path))
            delivered["takes"].append({**take.to_json(), "lines": take.caption_lines(), "take": [number, job.takes]})
    return delivered


def _from_parent(run: Run) -> dict:
    """Reroll, Extend, Remix, Redo, Edit captions: from the parent's kept track, which the job holds links to."""
    kept = Kept.load(run.files.parent_files(run.job), run.pipeline.read_clip)
    derivation = KINDS[run.job.kind].derivation
    assert derivation is not None, "a kind run by _from_parent declares its derivation"
    result = derivation(
        run.pipeline,
        kept,
        Request.of(run.job),
        seed=run.job.seed,
        progress=run.progress,
        cancel=run.cancel,
        on_captions=run.on_captions,
    )
    return _keep(run, result, kept.clip)


def _midi(run: Run) -> dict:
    run.progress(Progress("transcribing the notes"))
    transcription = run.pipeline.transcribe(run.files.parent_files(run.job).track)
    run.files.output_path(run.job.id, MIDI_FILES[0]).write_bytes(transcription.midi_bytes())
    return {"notes": len(transcription.notes), "lines": []}


def _describe_image(run: Run) -> dict:
    """/library image: the picture in words; delivery searches the server's library with them."""
    run.progress(Progress("describing the picture"))
    picture = run.pipeline.describe_image(_stored(run.job.image_path, "picture")).strip()
    if not picture:
        raise InputError("I could not put this picture into words; please try another one.")
    return {"picture": picture, "lines": []}


def _extend_seconds(length: int, request: Request, max_output_seconds: int) -> int:
    if request.duration is None:
        raise InputError("Say how many seconds to add.")
    check_extension(length, request.duration, max_output_seconds)
    return request.duration


_UPLOADS = frozenset({Role.CLIP, Role.IMAGE})
_PARENT = frozenset({Role.CLIP, Role.PARENT_TRACK, Role.PARENT_STATE})  # the clip for the melody, where there was one

KINDS: dict[JobKind, KindSpec] = {
    JobKind.COMPOSE: KindSpec(
        "Compose",
        _compose,
        _UPLOADS,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("captioner", "refiner", "generator", "image_captioner"),
    ),
    JobKind.CAPTION: KindSpec(
        "Caption", _caption, frozenset({Role.CLIP}), (), Rendering.CAPTIONS, loads=("captioner",)
    ),
    JobKind.LIBRARY_IMAGE: KindSpec(
        "Library picture search",
        _describe_image,
        frozenset({Role.IMAGE}),
        (),
        Rendering.PICTURE_SEARCH,
        loads=("image_captioner",),
        private=True,
    ),
    JobKind.REROLL: KindSpec(
        "Reroll",
        _from_parent,
        _PARENT,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("generator",),
        derivation=lambda pipeline, kept, request, **run: pipeline.reroll(kept, **run),
        origin="another take of job `{parent}` (the same captions, a new seed)",
        generates=lambda length, request, limit: length,
    ),
    JobKind.EXTEND: KindSpec(
        "Extend",
        _from_parent,
        _PARENT,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("generator",),
        derivation=lambda pipeline, kept, request, **run: pipeline.extend(kept, request.duration, **run),
        origin="extended from job `{parent}` by {seconds} s",
        generates=_extend_seconds,
    ),
    JobKind.REMIX: KindSpec(
        "Remix",
        _from_parent,
        _PARENT,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("refiner", "generator"),
        derivation=lambda pipeline, kept, request, **run: pipeline.remix(kept, request.instruction, **run),
        origin="remixed from job `{parent}` with a new instruction",
        generates=lambda length, request, limit: length,
    ),
    JobKind.REDO: KindSpec(
        "Redo",
        _from_parent,
        _PARENT,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("generator",),
        derivation=lambda pipeline, kept, request, **run: pipeline.redo(kept, request.redo_from, **run),
        origin="job `{parent}` redone from {redo_from} (everything before it kept)",
        generates=lambda length, request, limit: length - int(request.redo_from or 0),
    ),
    JobKind.EDIT: KindSpec(
        "Edit captions",
        _from_parent,
        _PARENT,
        TRACK_FILES,
        Rendering.TRACK,
        loads=("generator",),
        derivation=lambda pipeline, kept, request, **run: pipeline.edit(kept, request.captions, **run),
        origin="job `{parent}` with edited captions (the same plan, a new seed)",
        generates=lambda length, request, limit: length,
    ),
    JobKind.MIDI: KindSpec(
        "MIDI",
        _midi,
        frozenset({Role.PARENT_TRACK}),
        MIDI_FILES,
        Rendering.MIDI_FILE,
        private=True,
        origin="the notes of job `{parent}`",
        generates=lambda length, request, limit: None,
    ),
}

MAKES_TRACK = frozenset(kind for kind, spec in KINDS.items() if spec.makes_track)
# Everything that may travel through Redis for any kind (a stale attempt's blobs are deleted by these names).
INPUT_ROLES = frozenset(role for spec in KINDS.values() for role in spec.reads)
RESULT_SUFFIXES = tuple(dict.fromkeys(suffix for spec in KINDS.values() for suffix in spec.writes)) + tuple(
    suffix for take in range(2, MAX_TAKES + 1) for suffix in take_files(take)
)


def result_suffixes(job: Job) -> tuple[str, ...]:
    """The files a finished job writes, by suffix: its kind's, and a compose job's further takes'."""
    takes = job.takes if KINDS[job.kind].makes_track else 1
    return KINDS[job.kind].writes + tuple(suffix for take in range(2, takes + 1) for suffix in take_files(take))
