"""Durable jobs and the fair GPU queue.

A `Job` is one /compose or /caption request. `JobStore` keeps every job in SQLite
(`storage_dir/jobs.sqlite3`) and its files beside it, named by job id, never by the user's filename:
`storage_dir/inputs/<id>.<ext>` (the uploaded clip), `storage_dir/inputs/<id>.image.<ext>` (a /compose
picture), `storage_dir/outputs/<id>.wav` (the track) and `outputs/<id>.kept.npz` (its codes and the rest
of what the next job starts from: mtm_bot.kept). A compose job without a clip (input_path None) is made
from its instruction (and picture) alone. A job derived from a finished track (Reroll, Extend, Remix,
Redo, MIDI: `parent_id`) holds hard links to that track's kept files (`inputs/<id>.from.*` and its clip),
so it does not depend on how long the parent is kept.
`JobQueue` is the in-memory order in which the scheduler (mtm_bot.worker) starts jobs:
round-robin across users, FIFO within a user, with the limits from Settings.

How the bot uses it (see mtm_bot.worker for the Worker and the JobListener it calls back):

    store = await JobStore.open(settings)
    queue = JobQueue(settings)
    worker = Worker(settings, pipeline, store, queue, listener)
    await worker.start()                       # recovery first, then serving

    queue.check(user_id)                       # QueueFull / TooManyJobs before downloading anything
    job = Job.new(JobKind.COMPOSE, user_id=..., guild_id=..., channel_id=..., instruction=...,
                  duration=pipeline.output_duration(clip, requested),  # resolved seconds: better ETAs
                  attachment_size_limit=..., application_id=..., interaction_token=...)
    job.input_path = await store.save_input(job.id, data, attachment.filename)
    clip = await asyncio.to_thread(pipeline.read_clip, job.input_path)   # on InputError:
                                               #   await store.delete_files(job.id)
    position = await worker.submit(job)        # 1 = next to run; QueueFull / TooManyJobs
    queue.eta(job.id)                          # seconds until it starts, None before any measurement
    queue.snapshot()                           # /queue: running job + queued jobs in run order
    queue.unfinished_of(user_id)               # the caller's queued/running jobs, newest last
    await worker.cancel(job_id_or_None, user_id, guild_id=..., is_manager=...)   # /cancel: the job comes
                                               #   back CANCELLED if it was queued, still RUNNING if it was
                                               #   running (it stops at its next decode step)
    await store.recent_of(user_id)             # the caller's latest jobs, finished ones included

A finished job carries `result_json` with a "lines" list: one `M:SS–M:SS caption` line per output
block (compose) or per input segment (caption), ready to post; compose jobs also carry
`result_path` (16-bit WAV) and the full ComposeResult.to_json() fields.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import shutil
import time
from collections import deque
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

import aiofiles
import aiofiles.os
import aiosqlite

from .errors import InputError
from .kept import KeptFiles, ResultExpired
from .settings import Settings


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED = (JobState.QUEUED, JobState.RUNNING)
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    COMPOSE = "compose"
    CAPTION = "caption"
    LIBRARY_IMAGE = "library_image"  # /library image: the worker describes the picture, delivery searches with it
    # Derived from a finished track (its parent), by the buttons under it:
    REROLL = "reroll"  # the same captions, a new seed
    EXTEND = "extend"  # `duration` seconds more after the end
    REMIX = "remix"  # the stored input captions refined with a new instruction
    REDO = "redo"  # everything from the block at `redo_from` seconds generated again
    MIDI = "midi"  # the track's notes as a MIDI file


# Kinds whose result is a track (and a kept state that the next job can start from).
MAKES_TRACK = frozenset({JobKind.COMPOSE, JobKind.REROLL, JobKind.EXTEND, JobKind.REMIX, JobKind.REDO})
DERIVED = frozenset({JobKind.REROLL, JobKind.EXTEND, JobKind.REMIX, JobKind.REDO, JobKind.MIDI})


class QueueFull(InputError):
    pass


class TooManyJobs(InputError):
    pass


class JobNotFound(InputError):
    pass


class NotCancellable(InputError):
    """The job exists but has already finished, or belongs to someone else."""


@dataclass
class Job:
    id: str  # 8 hex characters; what /cancel takes
    kind: JobKind
    user_id: int
    guild_id: int | None
    channel_id: int
    instruction: str  # "" for caption jobs
    duration: int | None  # seconds of music the job generates; None = the clip's length rounded up to whole blocks
    attachment_size_limit: int  # the interaction's upload limit, kept for delivery after a restart
    application_id: int
    interaction_token: str
    created_at: float  # Unix time
    input_path: Path | None = None
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # the user-facing message of a failed job
    seed: int | None = None  # chosen and stored before the first run, so a resumed job sounds the same
    resumed: bool = False  # ran again after a restart
    delivered: bool = False  # the listener has posted the outcome
    result_path: Path | None = None
    result_json: dict | None = None
    image_path: Path | None = None  # a compose job's picture (stored like the clip)
    parent_id: str | None = None  # a derived job's parent: the finished track it builds on
    redo_from: int | None = None  # a redo: the output second the regenerated part starts at
    attempt: int = 0  # times handed to a GPU worker (distributed mode): a result of an older attempt is stale

    @classmethod
    def new(cls, kind: JobKind | str, *, user_id: int, guild_id: int | None, channel_id: int,
            instruction: str = "", duration: int | None = None, attachment_size_limit: int,
            application_id: int, interaction_token: str, parent_id: str | None = None,
            redo_from: int | None = None) -> "Job":
        return cls(secrets.token_hex(4), JobKind(kind), user_id, guild_id, channel_id, instruction, duration,
                   attachment_size_limit, application_id, interaction_token, created_at=time.time(),
                   parent_id=parent_id, redo_from=redo_from)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    guild_id INTEGER,
    channel_id INTEGER NOT NULL,
    instruction TEXT NOT NULL,
    duration INTEGER,
    attachment_size_limit INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    interaction_token TEXT NOT NULL,
    created_at REAL NOT NULL,
    input_path TEXT,
    state TEXT NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    seed INTEGER,
    resumed INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    result_path TEXT,
    result_json TEXT,
    image_path TEXT,
    parent_id TEXT,
    redo_from INTEGER,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_guild ON jobs (guild_id, kind, created_at);
"""

_COLUMNS = [f.name for f in fields(Job)]
# Columns added after the first release: a database created before them gets them at open().
_ADDED_COLUMNS = {"image_path": "TEXT", "parent_id": "TEXT", "redo_from": "INTEGER",
                  "attempt": "INTEGER NOT NULL DEFAULT 0"}


def _to_row(job: Job) -> tuple:
    row = []
    for name in _COLUMNS:
        value = getattr(job, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, StrEnum):
            value = value.value
        row.append(value)
    return tuple(row)


def _from_row(row: aiosqlite.Row) -> Job:
    values = dict(zip(_COLUMNS, row))
    values["kind"] = JobKind(values["kind"])
    values["state"] = JobState(values["state"])
    values["resumed"] = bool(values["resumed"])
    values["delivered"] = bool(values["delivered"])
    for name in ("input_path", "result_path", "image_path"):
        values[name] = Path(values[name]) if values[name] is not None else None
    if values["result_json"] is not None:
        values["result_json"] = json.loads(values["result_json"])
    return Job(**values)


_AUDIO_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")


class JobFiles:
    """Where a job's files live under a storage folder: the bot's storage, or a GPU worker's scratch folder."""

    def __init__(self, storage_dir: Path) -> None:
        self.storage_dir = storage_dir
        self.inputs_dir = storage_dir / "inputs"
        self.outputs_dir = storage_dir / "outputs"

    def make_folders(self) -> None:
        for folder in (self.storage_dir, self.inputs_dir, self.outputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def output_path(self, job_id: str, suffix: str = ".wav") -> Path:
        return self.outputs_dir / f"{job_id}{suffix}"

    def result_files(self, job: Job) -> dict[str, Path]:
        """What a finished job leaves for delivery, by suffix: the track and its kept state, or a MIDI file."""
        if job.kind in MAKES_TRACK:
            return {suffix: self.output_path(job.id, suffix) for suffix in (".wav", ".kept.npz")}
        if job.kind is JobKind.MIDI:
            return {".mid": self.output_path(job.id, ".mid")}
        return {}

    def input_files(self, job: Job) -> dict[str, Path]:
        """What a job reads, by role: its clip, its picture, and a derived job's links to its parent's kept
        track and state (what travels to a GPU worker in distributed mode)."""
        files = {"clip": job.input_path, "image": job.image_path}
        if job.parent_id is not None:
            parent = self.parent_files(job)
            files.update(parent_track=parent.track, parent_state=parent.state)
        return {role: path for role, path in files.items() if path is not None}

    def kept_files(self, job: Job) -> KeptFiles:
        """What a finished track keeps for the jobs derived from it (mtm_bot.kept), beside its files."""
        return KeptFiles(self.output_path(job.id), self.output_path(job.id, ".kept.npz"), job.input_path)

    def parent_files(self, job: Job) -> KeptFiles:
        """A derived job's own links to its parent's kept files (JobStore.link_parent)."""
        return KeptFiles(self.inputs_dir / f"{job.id}.from.wav", self.inputs_dir / f"{job.id}.from.npz",
                         job.input_path)


class JobStore(JobFiles):
    """Jobs in SQLite (committed on every write, so a crash loses nothing) and their files on disk."""

    def __init__(self, storage_dir: Path, db: aiosqlite.Connection, retention_hours: float) -> None:
        super().__init__(storage_dir)
        self.retention_hours = retention_hours
        self._db = db

    @classmethod
    async def open(cls, settings: Settings) -> "JobStore":
        JobFiles(Path(settings.storage_dir)).make_folders()
        db = await aiosqlite.connect(settings.database_path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(_SCHEMA)
        async with db.execute("PRAGMA table_info(jobs)") as cursor:
            present = {row[1] for row in await cursor.fetchall()}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                await db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        await db.commit()
        return cls(Path(settings.storage_dir), db, settings.retention_hours)

    async def close(self) -> None:
        await self._db.close()

    async def add(self, job: Job) -> None:
        marks = ", ".join("?" * len(_COLUMNS))
        await self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", _to_row(job))
        await self._db.commit()

    async def update(self, job: Job) -> None:
        assignments = ", ".join(f"{name} = ?" for name in _COLUMNS)
        await self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*_to_row(job), job.id))
        await self._db.commit()

    async def get(self, job_id: str) -> Job | None:
        jobs = await self._select("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def unfinished(self) -> list[Job]:
        """Queued and running jobs, oldest first: what must run again after a restart."""
        return await self._select("WHERE state IN (?, ?) ORDER BY created_at", UNFINISHED)

    async def undelivered(self) -> list[Job]:
        """Finished jobs whose outcome the listener has not yet posted."""
        return await self._select("WHERE state IN (?, ?, ?) AND delivered = 0 ORDER BY finished_at", TERMINAL)

    async def mark_delivered(self, job_id: str) -> None:
        await self._db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))
        await self._db.commit()

    async def recent_of(self, user_id: int, limit: int = 5) -> list[Job]:
        """The user's latest jobs, newest first."""
        return await self._select("WHERE user_id = ? ORDER BY created_at DESC LIMIT ?", (user_id, limit))

    async def recent_instructions(self, guild_id: int, containing: str, *, max_chars: int, limit: int) -> list[str]:
        """This server's distinct compose instructions, newest first: those that contain `containing` (ignoring
        ASCII case) and are at most `max_chars` long (what /compose's suggestions can offer)."""
        query = """SELECT instruction FROM jobs
                   WHERE guild_id = ? AND kind = ? AND instruction != '' AND length(instruction) <= ?
                         AND instr(lower(instruction), lower(?)) > 0
                   GROUP BY instruction ORDER BY max(created_at) DESC LIMIT ?"""
        params = (guild_id, JobKind.COMPOSE.value, max_chars, containing, limit)
        async with self._db.execute(query, params) as cursor:
            return [row[0] for row in await cursor.fetchall()]

    async def recent_done(self, limit: int = 20) -> list[Job]:
        """The latest successful jobs, newest first (the ETA estimate starts from their timings)."""
        return await self._select("WHERE state = ? ORDER BY finished_at DESC LIMIT ?", (JobState.DONE, limit))

    async def expired(self, before: float) -> list[Job]:
        """Finished jobs that finished before `before` (Unix time)."""
        return await self._select("WHERE state IN (?, ?, ?) AND finished_at < ?", (*TERMINAL, before))

    async def _select(self, where: str, params: tuple) -> list[Job]:
        async with self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where}", params) as cursor:
            return [_from_row(row) for row in await cursor.fetchall()]

    # Files -----------------------------------------------------------------------------------

    async def save_input(self, job_id: str, data: bytes, filename: str, role: str = "") -> Path:
        """Store an upload as inputs/<id>[.<role>]<ext> (role "image" for a picture, "" for the clip); only
        a short alphanumeric extension of the user's name is kept."""
        suffix = Path(filename).suffix.lower()
        stem = f"{job_id}.{role}" if role else job_id
        path = self.inputs_dir / (stem + (suffix if _AUDIO_SUFFIX.fullmatch(suffix) else ""))
        partial = path.with_name(path.name + ".part")  # a crash mid-write never leaves a half clip under the real name
        async with aiofiles.open(partial, "wb") as out:
            await out.write(data)
        await aiofiles.os.replace(partial, path)
        return path

    async def parent_for(self, job_id: str) -> Job:
        """The finished track a derived job builds on; ResultExpired once it is no longer kept."""
        parent = await self.get(job_id)
        if (parent is None or parent.state is not JobState.DONE or parent.kind not in MAKES_TRACK
                or not self.kept_files(parent).exist()):
            hours = self.retention_hours
            kept_for = f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"
            raise ResultExpired(f"This result has expired: tracks are kept for {kept_for} after they are made. "
                                "Run /compose again to start a new one.")
        return parent

    async def link_parent(self, child: Job, parent: Job) -> None:
        """Give a derived job its own hard links to the parent's track, state and clip, so it runs (and
        its result can be built on) however long the parent is still kept."""
        kept, own = self.kept_files(parent), self.parent_files(child)
        links = [(kept.track, own.track), (kept.state, own.state)]
        if kept.clip is not None:
            child.input_path = self.inputs_dir / f"{child.id}{kept.clip.suffix}"
            links.append((kept.clip, child.input_path))
        try:
            for source, target in links:
                await asyncio.to_thread(_link_or_copy, source, target)
        except FileNotFoundError:  # cleaned up between parent_for and here
            raise ResultExpired("This result has just expired; run /compose again to start a new one.") from None

    async def delete(self, job_id: str) -> None:
        """Forget a job: its row and its files (a refused submission)."""
        await self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        await self._db.commit()
        await self.delete_files(job_id)

    async def delete_files(self, job_id: str) -> None:
        """Delete a job's stored clip, picture and track, e.g. an upload refused before the job was submitted."""
        for folder in (self.inputs_dir, self.outputs_dir):
            for path in folder.glob(f"{job_id}*"):
                await aiofiles.os.remove(path)

    async def cleanup(self, before: float) -> int:
        """Delete files and rows of jobs finished before `before`, and orphan files older than that.

        Files of queued or running jobs are always kept. Returns the number of files deleted.
        """
        deleted = 0
        for folder in (self.inputs_dir, self.outputs_dir):
            for path in folder.iterdir():
                job = await self.get(path.name.split(".")[0])
                if job is None:
                    try:  # orphan: a refused upload or a crash before add(); or an upload being written right now
                        old = path.stat().st_mtime < before
                    except FileNotFoundError:  # ... and renamed meanwhile
                        continue
                else:
                    old = job.finished and job.finished_at is not None and job.finished_at < before
                if old:
                    path.unlink(missing_ok=True)
                    deleted += 1
        await self._db.execute("DELETE FROM jobs WHERE state IN (?, ?, ?) AND finished_at < ?", (*TERMINAL, before))
        await self._db.commit()
        return deleted


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:  # a retried submission
        pass
    except OSError:  # no hard links on this file system
        shutil.copyfile(source, target)


class DurationEstimate:
    """Exponential moving averages of how long jobs take, for queue ETAs.

    Jobs that make a track are measured in wall seconds per second of music generated; caption, picture-search
    and MIDI jobs (one model pass each) per job.
    """

    WEIGHT = 0.3  # of the newest measurement

    def __init__(self, default_output_seconds: int) -> None:
        self.default_output_seconds = default_output_seconds
        self.seconds_per_output_second: float | None = None
        self.seconds_per_caption: float | None = None

    def record(self, job: Job, wall_seconds: float) -> None:
        if job.kind in MAKES_TRACK:
            output_seconds = job.duration or (job.result_json or {}).get("duration") or self.default_output_seconds
            self.seconds_per_output_second = self._mix(self.seconds_per_output_second, wall_seconds / output_seconds)
        else:
            self.seconds_per_caption = self._mix(self.seconds_per_caption, wall_seconds)

    def seconds(self, job: Job) -> float | None:
        """Expected run time; None until a job of this kind has been measured."""
        if job.kind not in MAKES_TRACK:
            return self.seconds_per_caption
        if self.seconds_per_output_second is None:
            return None
        return self.seconds_per_output_second * (job.duration or self.default_output_seconds)

    def _mix(self, average: float | None, value: float) -> float:
        return value if average is None else (1 - self.WEIGHT) * average + self.WEIGHT * value


@dataclass(frozen=True)
class QueueEntry:
    job: Job
    position: int  # 1 = next to run
    starts_in: float | None  # seconds, None when there is no estimate yet


@dataclass(frozen=True)
class QueueSnapshot:
    running: list[Job]  # oldest first
    running_left: list[float | None]  # estimated seconds until each running job finishes
    queued: list[QueueEntry] = field(default_factory=list)


class JobQueue:
    """Which job runs next: round-robin across users, FIFO within a user; up to `capacity` at once.

    The next job belongs to the waiting user who was served least recently (never served first; ties go
    to the older job), so a user with three jobs does not starve the others. In-memory only: the store is
    the durable copy, and the worker refills the queue from it after a restart. The worker runs up to
    `capacity` jobs at once: settings.max_batch in one process (their MusicGen blocks batched together),
    the live GPU workers' slots together in distributed mode.
    """

    def __init__(self, settings: Settings) -> None:
        self.max_length = settings.max_queue_length
        self.max_per_user = settings.max_jobs_per_user
        self.capacity = settings.max_batch
        # Unknown output length = the longest clip rounded up to whole blocks: ETAs err on the long side.
        default_output = min(settings.max_output_seconds, 10 * math.ceil(settings.max_clip_seconds / 10))
        self.estimate = DurationEstimate(default_output)
        self.running: list[Job] = []
        self._waiting: dict[int, deque[Job]] = {}  # user id -> that user's jobs, oldest first
        self._last_served: dict[int, int] = {}  # user id -> serve counter when their last job started
        self._served = 0
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._waiting.values())

    def check(self, user_id: int) -> None:
        """Raise QueueFull / TooManyJobs if a new job of this user would be refused."""
        mine = len(self.unfinished_of(user_id))
        if mine >= self.max_per_user:
            raise TooManyJobs(
                f"You already have {mine} unfinished job{'s' * (mine != 1)}; the limit is {self.max_per_user} "
                f"per user. Wait until one finishes, or stop one with /cancel, then try again."
            )
        if len(self) >= self.max_length:
            lefts = [left for left in map(self._left, self.running) if left is not None]
            wait = min(lefts) if lefts else None  # a slot frees up when a running job ends and the next one starts
            minutes = math.ceil(max(wait, 60) / 60) if wait is not None else None
            when = f"in about {minutes} minute{'s' * (minutes != 1)}" if minutes else "in a few minutes"
            raise QueueFull(f"The queue is full ({len(self)} jobs waiting; the limit is {self.max_length}). "
                            f"Please try again {when}.")

    def submit(self, job: Job) -> int:
        """Enqueue within the limits; returns the 1-based position (1 = next to run)."""
        self.check(job.user_id)
        return self.restore(job)

    def restore(self, job: Job) -> int:
        """Enqueue without limits: jobs accepted before a restart are never refused afterwards."""
        self._waiting.setdefault(job.user_id, deque()).append(job)
        self._changed.set()
        return self.position(job.id)

    async def next(self) -> Job:
        """Wait for a job, mark it running and return it (the worker asks only while it has a free slot)."""
        while not self._waiting:
            self._changed.clear()
            await self._changed.wait()
        job = self._run_order()[0]
        self._pop(job)
        self._served += 1
        if not self._waiting:  # nobody waits: forget older history, it only grew with every user ever served
            self._last_served.clear()
        self._last_served[job.user_id] = self._served
        self.running.append(job)
        return job

    def adopt(self, job: Job) -> None:
        """A job a GPU worker was already running when the bot restarted: running again, without a turn."""
        self.running.append(job)

    def finish(self, job: Job, wall_seconds: float | None = None) -> None:
        """A running job ended; a successful job's duration (`wall_seconds`) feeds the ETA."""
        self.running = [j for j in self.running if j.id != job.id]
        if wall_seconds is not None:
            self.estimate.record(job, wall_seconds)

    def remove(self, job_id: str) -> Job | None:
        """Take a queued job out (cancel); positions of the jobs behind it shift up."""
        job = self.get(job_id)
        if job is None or job in self.running:
            return None
        self._pop(job)
        return job

    def get(self, job_id: str) -> Job | None:
        """A queued or running job by id (case-insensitive)."""
        job_id = job_id.strip().lower()
        return next((j for j in [*self.running, *(j for jobs in self._waiting.values() for j in jobs)]
                     if j.id == job_id), None)

    def unfinished_of(self, user_id: int) -> list[Job]:
        """The user's running and queued jobs, oldest first."""
        return [j for j in self.running if j.user_id == user_id] + list(self._waiting.get(user_id, ()))

    def position(self, job_id: str) -> int | None:
        """1-based place among the queued jobs (1 = next to run); None if not queued."""
        return next((i for i, j in enumerate(self._run_order(), 1) if j.id == job_id), None)

    def eta(self, job_id: str) -> float | None:
        """Seconds until the job starts (0 if running); None if unknown."""
        if any(j.id == job_id for j in self.running):
            return 0.0
        return next((e.starts_in for e in self.snapshot().queued if e.job.id == job_id), None)

    def snapshot(self) -> QueueSnapshot:
        """The running jobs and the queued jobs in the order they will run, with start estimates: each
        queued job takes the slot that frees up first."""
        lefts = [self._left(job) for job in self.running]
        slots = lefts + [0.0] * max(0, self.capacity - len(self.running))  # when each slot frees up
        entries = []
        for position, job in enumerate(self._run_order(), 1):
            start = None
            if slots is not None:
                known = [t for t in slots if t is not None]
                if known and (len(known) == len(slots) or min(known) == 0.0):  # a free slot needs no estimate
                    start = min(known)
            entries.append(QueueEntry(job, position, start))
            if start is None:
                slots = None  # one unknown start makes every later one unknown
                continue
            needed = self.estimate.seconds(job)
            slots[slots.index(start)] = None if needed is None else start + needed
        return QueueSnapshot(list(self.running), lefts, entries)

    def _run_order(self) -> list[Job]:
        """Simulate the round-robin to list the queued jobs in the order they will start."""
        waiting = {user: list(jobs) for user, jobs in self._waiting.items()}
        last_served = dict(self._last_served)
        order: list[Job] = []
        while waiting:
            user = min(waiting, key=lambda u: (last_served.get(u, -1), waiting[u][0].created_at))
            order.append(waiting[user].pop(0))
            last_served[user] = self._served + len(order)
            if not waiting[user]:
                del waiting[user]
        return order

    def _pop(self, job: Job) -> None:
        jobs = self._waiting[job.user_id]
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.user_id]

    def _left(self, job: Job) -> float | None:
        """Estimated seconds until a running job finishes; None without an estimate."""
        needed = self.estimate.seconds(job)
        if needed is None:
            return None
        return max(0.0, needed - (time.time() - (job.started_at or time.time())))
