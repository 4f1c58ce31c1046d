"""Where jobs are kept: `JobStore` keeps every job in SQLite (`storage_dir/jobs.sqlite3`) and its files
beside it, named by job id, never by the user's filename: `storage_dir/inputs/<id>.<ext>` (the uploaded
clip), `storage_dir/inputs/<id>.image.<ext>` (a /compose picture), `storage_dir/outputs/<id>.wav` (the
track) and `outputs/<id>.kept.npz` (its codes and the rest of what the next job starts from:
mtm_bot.stages.kept). A job derived from a finished track holds hard links to that track's kept files
(`inputs/<id>.from.*` and its clip), so it does not depend on how long the parent is kept.
`JobFiles` names those files under any folder: the bot's storage, or a GPU worker's scratch folder.

    store = await JobStore.open(settings)
    job.input_path = await store.save_input(job.id, data, attachment.filename)
    await store.add(job)                       # the scheduler does this on submit (mtm_bot.jobs.scheduler)
    await store.recent_of(user_id)             # the caller's latest jobs, finished ones included
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
from dataclasses import fields
from enum import StrEnum
from pathlib import Path

import aiofiles
import aiofiles.os
import aiosqlite

from ..core.settings import Settings
from ..stages.kept import KeptFiles, ResultExpired
from .job import TERMINAL, UNFINISHED, Job, JobKind, JobState, take_id
from .kinds import KINDS, TRACK_FILES, Role, result_suffixes, take_files

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
    captions TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    takes INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_guild ON jobs (guild_id, kind, created_at);
"""

_COLUMNS = [f.name for f in fields(Job)]
# Columns added after the first release: a database created before them gets them at open().
_ADDED_COLUMNS = {
    "image_path": "TEXT",
    "parent_id": "TEXT",
    "redo_from": "INTEGER",
    "attempt": "INTEGER NOT NULL DEFAULT 0",
    "captions": "TEXT",
    "takes": "INTEGER NOT NULL DEFAULT 1",
}


def _to_row(job: Job) -> tuple:
    row = []
    for name in _COLUMNS:
        value = getattr(job, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, (dict, list)):
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
    for name in ("result_json", "captions"):
        if values[name] is not None:
            values[name] = json.loads(values[name])
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
        """What a finished job leaves for delivery, by suffix (its kind's `writes`): a track and its kept state,
        a MIDI file, or nothing."""
        return {suffix: self.output_path(job.id, suffix) for suffix in result_suffixes(job)}

    def input_files(self, job: Job) -> dict[Role, Path]:
        """What a job reads, by role (its kind's `reads`): its clip, its picture, and a derived job's links to its
        parent's kept track and state (what travels to a GPU worker in distributed mode)."""
        spec = KINDS[job.kind]
        files = {Role.CLIP: job.input_path, Role.IMAGE: job.image_path}
        if spec.derived:
            parent = self.parent_files(job)
            files.update({Role.PARENT_TRACK: parent.track, Role.PARENT_STATE: parent.state})
        return {role: path for role, path in files.items() if path is not None and role in spec.reads}

    def kept_files(self, job: Job) -> KeptFiles:
        """What a finished track keeps for the jobs derived from it (mtm_bot.stages.kept), beside its files."""
        return KeptFiles(self.output_path(job.id), self.output_path(job.id, ".kept.npz"), job.input_path)

    def parent_files(self, job: Job) -> KeptFiles:
        """A derived job's own links to its parent's kept files (JobStore.link_parent)."""
        return KeptFiles(self.inputs_dir / f"{job.id}.from.wav", self.inputs_dir / f"{job.id}.from.npz", job.input_path)


class JobStore(JobFiles):
    """Jobs in SQLite (committed on every write, so a crash loses nothing) and their files on disk."""

    def __init__(self, storage_dir: Path, db: aiosqlite.Connection, retention_hours: float) -> None:
        super().__init__(storage_dir)
        self.retention_hours = retention_hours
        self._db = db

    @classmethod
    async def open(cls, settings: Settings) -> JobStore:
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

    async def record_takes(self, job: Job) -> list[Job]:
        """A finished compose job's takes 2, 3, …: each becomes a finished job of its own (take_id, so a job
        that ran again after a restart names them the same), with hard links to its files; the jobs not
        recorded before, to deliver. The compose job's result keeps only their ids."""
        entries = (job.result_json or {}).get("takes") or []
        if not entries or not isinstance(entries[0], dict):
            return []
        recorded = []
        for entry in entries:
            number = entry["take"][0]
            take = dataclasses.replace(job, id=take_id(job.id, number), takes=1, result_json=entry, delivered=False)
            take.result_path = self.output_path(take.id)
            targets = (take.result_path, self.output_path(take.id, TRACK_FILES[1]))
            for suffix, target in zip(take_files(number), targets):
                source = self.output_path(job.id, suffix)
                await asyncio.to_thread(_link_or_copy, source, target)
                await aiofiles.os.remove(source)
            marks = ", ".join("?" * len(_COLUMNS))
            cursor = await self._db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", _to_row(take)
            )
            if cursor.rowcount:
                recorded.append(take)
        await self._db.commit()
        job.result_json = {**(job.result_json or {}), "takes": [take_id(job.id, e["take"][0]) for e in entries]}
        return recorded

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
        if (
            parent is None
            or parent.state is not JobState.DONE
            or not KINDS[parent.kind].makes_track
            or not self.kept_files(parent).exist()
        ):
            hours = self.retention_hours
            kept_for = f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"
            raise ResultExpired(
                f"This result has expired: tracks are kept for {kept_for} after they are made. "
                "Run /compose again to start a new one."
            )
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
