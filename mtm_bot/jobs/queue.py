"""The fair GPU queue: the in-memory order in which the scheduler (mtm_bot.jobs.scheduler) starts jobs,
round-robin across users, FIFO within a user, with the limits from Settings, and the ETAs it shows.

    queue = JobQueue(settings)
    queue.check(user_id)                       # QueueFull / TooManyJobs before downloading anything
    position = await scheduler.submit(job)     # 1 = next to run (mtm_bot.jobs.scheduler)
    queue.eta(job.id)                          # seconds until it starts, None before any measurement
    queue.snapshot()                           # /queue: running jobs + queued jobs in run order
    queue.unfinished_of(user_id)               # the caller's queued/running jobs, newest last
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from ..core.errors import InputError
from ..core.settings import Settings
from .job import Job
from .kinds import KINDS


class QueueFull(InputError):
    pass


class TooManyJobs(InputError):
    pass


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
        if KINDS[job.kind].makes_track:
            output_seconds = job.duration or (job.result_json or {}).get("duration") or self.default_output_seconds
            self.seconds_per_output_second = self._mix(self.seconds_per_output_second, wall_seconds / output_seconds)
        else:
            self.seconds_per_caption = self._mix(self.seconds_per_caption, wall_seconds)

    def seconds(self, job: Job) -> float | None:
        """Expected run time; None until a job of this kind has been measured."""
        if not KINDS[job.kind].makes_track:
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
            raise QueueFull(
                f"The queue is full ({len(self)} jobs waiting; the limit is {self.max_length}). "
                f"Please try again {when}."
            )

    def submit(self, job: Job) -> int:
        """Enqueue within the limits; returns the 1-based position (1 = next to run)."""
        self.check(job.user_id)
        return self.restore(job)

    def restore(self, job: Job) -> int:
        """Enqueue without limits: jobs accepted before a restart are never refused afterwards."""
        self._waiting.setdefault(job.user_id, deque()).append(job)
        self._changed.set()
        position = self.position(job.id)
        assert position is not None, "the job was just queued"
        return position

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
        return next(
            (j for j in [*self.running, *(j for jobs in self._waiting.values() for j in jobs)] if j.id == job_id), None
        )

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
        slots: list[float | None] | None = lefts + [0.0] * max(
            0, self.capacity - len(self.running)
        )  # when each frees up
        entries = []
        for position, job in enumerate(self._run_order(), 1):
            start = None
            if slots is not None:
                known = [t for t in slots if t is not None]
                if known and (len(known) == len(slots) or min(known) == 0.0):  # a free slot needs no estimate
                    start = min(known)
            entries.append(QueueEntry(job, position, start))
            if start is None or slots is None:
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
