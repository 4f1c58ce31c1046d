"""What the bot and its GPU workers say to each other through Redis (distributed mode).

Jobs travel as taskiq messages (JSON) on a Redis stream read by a consumer group (taskiq-redis's
RedisStreamBroker: a message is acknowledged only once its job is over). Everything else is plain Redis,
every key under settings.broker_prefix (`<p>` below):

    <p>:jobs                         stream   taskiq messages of task "mtm.run_job": one JSON order each
    <p>:events                       stream   JSON events from the workers to the bot
    <p>:worker:<id>                  string   a worker's heartbeat (JSON), expires after 3 heartbeats
    <p>:attempt:<job>                string   the attempt the bot wants run; an order of another one is stale
    <p>:cancel                       pub/sub  ids of jobs to stop now
    <p>:cancelled:<job>              string   the same, for a worker that takes the job later
    <p>:blob:<job>:<attempt>:<name>  bytes    a job's input files and results in transit (with a TTL)
    <p>:epoch                        string   set by the bot: gone means Redis was emptied (restarted)

An order, an event and a heartbeat are each one typed record here (Order, Event, Heartbeat) with one
to_json / from_json, used by the bot (mtm_bot.transport.distributed) and the GPU worker (mtm_bot.transport.gpu_worker) alike.
Every one carries "v": PROTOCOL_VERSION; a worker refuses an order of another version (it says so in its
log and hands the job back) instead of misreading it, and the bot gives a worker of another version no job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq.abc.broker import AckableMessage
from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisStreamBroker

from ..core.progress import Progress
from ..core.retry import Backoff, retry
from ..core.settings import Settings
from ..jobs.job import Job, JobKind, JobState
from ..jobs.kinds import Role
from ..jobs.store import JobFiles

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
TASK_NAME = "mtm.run_job"
# Redis cannot be reached, went away mid-command, or refuses writes for now: out of memory under its maxmemory
# (clips and tracks travel through it; memory frees as they are fetched or expire) or a read-only replica (a
# failover promotes one). Worth another try, never a traceback, never a task that dies and leaves jobs waiting.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, OutOfMemoryError, ReadOnlyError)
HEARTBEATS_TO_DEATH = 3  # a worker whose heartbeat is this many intervals old is dead
MAX_ATTEMPTS = 4  # a job that loses its worker this often fails instead of killing a fifth
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")
_JOB_ID = re.compile(r"[0-9a-f]{8}")


def redis_backoff() -> Backoff:
    return Backoff(1.0, 30.0)


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.jobs = f"{prefix}:jobs"
        self.workers_group = f"{prefix}:workers"
        self.events = f"{prefix}:events"
        self.bot_group = f"{prefix}:bot"
        self.cancel_channel = f"{prefix}:cancel"
        self.epoch = f"{prefix}:epoch"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def attempt(self, job_id: str) -> str:
        return f"{self.prefix}:attempt:{job_id}"

    def cancelled(self, job_id: str) -> str:
        return f"{self.prefix}:cancelled:{job_id}"

    def blob(self, job_id: str, attempt: int, name: str) -> str:
        """An input by its role, or a result as "result<suffix>" (mtm_bot.transport.blobs)."""
        return f"{self.prefix}:blob:{job_id}:{attempt}:{name}"


class OtherVersion(Exception):
    """A record of another protocol version: refused, never misread."""

    def __init__(self, version: object, job_id: str = "", attempt: int = 0) -> None:
        super().__init__(f"protocol version {version}")
        self.version, self.job_id, self.attempt = version, job_id, attempt


def _check_version(data: dict, job_id: str = "", attempt: int = 0) -> None:
    if data.get("v") != PROTOCOL_VERSION:
        raise OtherVersion(data.get("v"), job_id, attempt)


@dataclass(frozen=True)
class Order:
    """The bot's order to run one attempt of a job (a taskiq message's one argument): what a GPU worker needs
    of the job, and the suffix of each input file that travels as a blob."""

    job_id: str
    kind: JobKind
    attempt: int
    instruction: str = ""
    duration: int | None = None
    seed: int | None = None
    redo_from: int | None = None
    parent_id: str | None = None
    captions: list[str] | None = None
    inputs: dict[Role, str] = field(default_factory=dict)  # role -> file suffix
    takes: int = 1

    @classmethod
    def of(cls, job: Job, inputs: dict[Role, Path]) -> Order:
        return cls(
            job.id,
            job.kind,
            job.attempt,
            job.instruction,
            job.duration,
            job.seed,
            job.redo_from,
            job.parent_id,
            job.captions,
            {role: path.suffix.lower() for role, path in inputs.items()},
            job.takes,
        )

    def to_json(self) -> dict:
        return {
            "v": PROTOCOL_VERSION,
            "attempt": self.attempt,
            "job": {
                "id": self.job_id,
                "kind": self.kind.value,
                "instruction": self.instruction,
                "duration": self.duration,
                "seed": self.seed,
                "redo_from": self.redo_from,
                "parent_id": self.parent_id,
                "captions": self.captions,
                "takes": self.takes,
            },
            "inputs": {role.value: suffix for role, suffix in self.inputs.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> Order:
        """OtherVersion for an order of another version; KeyError, TypeError or ValueError for a malformed one."""
        job = data.get("job") or {}
        _check_version(data, str(job.get("id", "")), int(data.get("attempt", 0)))
        job_id = str(job["id"])
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id[:20]!r}")
        return cls(
            job_id,
            JobKind(job["kind"]),
            int(data["attempt"]),
            str(job.get("instruction", "")),
            job.get("duration"),
            job.get("seed"),
            job.get("redo_from"),
            job.get("parent_id"),
            job.get("captions"),
            {Role(role): check_suffix(suffix) for role, suffix in data.get("inputs", {}).items()},
            int(job.get("takes", 1)),
        )

    def job(self, files: JobFiles) -> Job:
        """The ordered job, its inputs in `files` (a GPU worker's scratch folder)."""
        job = Job(
            self.job_id,
            self.kind,
            user_id=0,
            guild_id=None,
            channel_id=0,
            instruction=self.instruction,
            duration=self.duration,
            attachment_size_limit=0,
            application_id=0,
            interaction_token="",
            created_at=time.time(),
            seed=self.seed,
            redo_from=self.redo_from,
            parent_id=self.parent_id,
            captions=self.captions,
            attempt=self.attempt,
            takes=self.takes,
        )
        if Role.CLIP in self.inputs:
            job.input_path = files.inputs_dir / f"{job.id}{self.inputs[Role.CLIP]}"
        if Role.IMAGE in self.inputs:
            job.image_path = files.inputs_dir / f"{job.id}.image{self.inputs[Role.IMAGE]}"
        return job


class EventType(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    CAPTIONS = "captions"  # the refined caption lines, before generation
    DONE = JobState.DONE.value
    FAILED = JobState.FAILED.value
    CANCELLED = JobState.CANCELLED.value
    RELEASED = "released"  # handed back: run it elsewhere


@dataclass(frozen=True)
class Event:
    """What a GPU worker tells the bot about one attempt of a job."""

    type: EventType
    job_id: str
    attempt: int
    worker: str
    at: float = field(default_factory=time.time)
    progress: Progress | None = None  # PROGRESS
    lines: list[str] | None = None  # CAPTIONS
    result_json: dict | None = None  # DONE
    results: dict[str, str] | None = None  # DONE: the result blobs' keys by suffix
    error: str | None = None  # FAILED
    reason: str | None = None  # RELEASED

    @property
    def outcome(self) -> JobState | None:
        """The job's final state, for a DONE, FAILED or CANCELLED event."""
        return JobState(self.type.value) if self.type in _OUTCOMES else None

    def to_json(self) -> dict:
        data = {
            "v": PROTOCOL_VERSION,
            "type": self.type.value,
            "job": self.job_id,
            "attempt": self.attempt,
            "worker": self.worker,
            "at": self.at,
        }
        if self.progress is not None:
            data.update(dataclasses.asdict(self.progress))
        extra = {
            "lines": self.lines,
            "result_json": self.result_json,
            "results": self.results,
            "error": self.error,
            "reason": self.reason,
        }
        return data | {name: value for name, value in extra.items() if value is not None}

    @classmethod
    def from_json(cls, data: dict) -> Event:
        """OtherVersion for an event of another version (its job and attempt said), ValueError and the like for
        a malformed one."""
        job_id, attempt = str(data.get("job")), int(data.get("attempt", 0))
        _check_version(data, job_id, attempt)
        kind = EventType(str(data.get("type")))
        progress = None
        if kind is EventType.PROGRESS:
            progress = Progress(
                str(data["stage"]), int(data["block"]), int(data["blocks"]), int(data["step"]), int(data["steps"])
            )
        lines = [str(line) for line in data["lines"]] if kind is EventType.CAPTIONS else None
        return cls(
            kind,
            job_id,
            attempt,
            str(data.get("worker") or ""),
            float(data.get("at", 0.0)),
            progress,
            lines,
            data.get("result_json"),
            data.get("results"),
            data.get("error"),
            data.get("reason"),
        )


_OUTCOMES = (EventType.DONE, EventType.FAILED, EventType.CANCELLED)


@dataclass(frozen=True)
class Heartbeat:
    """A GPU worker's sign of life (a key that expires after HEARTBEATS_TO_DEATH intervals)."""

    id: str
    name: str
    capacity: int
    running: dict[str, int]  # job id -> the attempt it runs
    device: str = ""
    at: float = field(default_factory=time.time)
    version: object = PROTOCOL_VERSION  # a worker of another version is listed, and given no job

    @property
    def compatible(self) -> bool:
        return self.version == PROTOCOL_VERSION

    def to_json(self) -> dict:
        return {
            "v": self.version,
            "id": self.id,
            "name": self.name,
            "capacity": self.capacity,
            "running": [[job_id, attempt] for job_id, attempt in self.running.items()],
            "device": self.device,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, data: dict) -> Heartbeat:
        return cls(
            str(data["id"]),
            str(data.get("name", data["id"])),
            int(data.get("capacity", 1)),
            {str(job_id): int(attempt) for job_id, attempt in data.get("running", [])},
            str(data.get("device", "")),
            float(data.get("at", 0.0)),
            data.get("v"),
        )


def encode(record: Order | Event | Heartbeat) -> bytes:
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


def check_suffix(suffix: str) -> str:
    """A file suffix from an order: short and alphanumeric, never a path."""
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"not a file suffix: {suffix[:20]!r}")
    return suffix


def safe_url(url: str | None) -> str:
    """The broker URL without its password, for logs ("unset" without one)."""
    if url is None:
        return "unset"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def why(err: BaseException) -> str:
    return str(err).strip() or type(err).__name__


def connect(settings: Settings) -> Redis:
    return Redis.from_url(
        settings.broker_url, socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30
    )


async def wait_for_redis(settings: Settings, who: str, stopping: asyncio.Event | None = None) -> bool:
    """Ping until Redis answers, one sentence per failed try and backing off; False if `stopping` was set."""
    redis = connect(settings)
    try:
        await retry(
            redis.ping,
            on=UNAVAILABLE,
            backoff=redis_backoff(),
            stopping=stopping,
            say=lambda err, delay: log.warning(
                "The %s cannot reach Redis at %s (%s); retrying in %.0f s.",
                who,
                safe_url(settings.broker_url),
                why(err),
                delay,
            ),
        )
        return True
    except UNAVAILABLE:
        return False
    finally:
        await redis.aclose()


async def retrying(what: str, call: Callable[[], Any], stopping: asyncio.Event | None = None):
    """`await call()` until Redis answers (a line per failure, backing off); a command that must not be lost.
    Once `stopping` is set, the failure is raised instead."""
    return await retry(
        call,
        on=UNAVAILABLE,
        backoff=redis_backoff(),
        stopping=stopping,
        say=lambda err, delay: log.warning(
            "Redis is unavailable while %s (%s); retrying in %.0f s.", what, why(err), delay
        ),
    )


class JobStream(RedisStreamBroker):
    """taskiq-redis's stream broker, set up for jobs that take minutes on a GPU:

    - one message per read (xread_count 1): a worker takes a job only for a free slot (taskiq's Receiver
      asks for the next message only then), so the bot's order is the order jobs start in;
    - no redelivery by idle time: taskiq-redis#101 reports XAUTOCLAIM giving a job whose worker is alive
      to another worker once it runs past idle_timeout. The bot hands out a dead worker's jobs again by
      its heartbeat instead (mtm_bot.transport.distributed), so a slow 3-minute track never runs twice;
    - a listener and acknowledgements that outlive Redis: a lost connection or an emptied Redis (the
      stream and its group gone) is one log line and a retry, and the group is created again.
    """

    NEVER_MS = 30 * 24 * 3600 * 1000

    def __init__(self, settings: Settings, consumer_name: str) -> None:
        self.keys = Keys(settings.broker_prefix)
        super().__init__(
            settings.broker_url,
            queue_name=self.keys.jobs,
            consumer_group_name=self.keys.workers_group,
            consumer_name=consumer_name,
            consumer_id="0",
            xread_count=1,
            xread_block=1000,
            idle_timeout=self.NEVER_MS,
            unacknowledged_batch_size=1,
            unacknowledged_lock_timeout=5,
            maxlen=10_000,
            socket_connect_timeout=5,
        )
        self.with_serializer(JSONSerializer())  # never pickle: a message from the broker is data, not code

    def _ack_generator(self, id: str, queue_name: str) -> Callable[[], Any]:
        """taskiq-redis's XACK, retried while Redis is away (the receiver would leave the error unretrieved)."""
        ack = super()._ack_generator(id, queue_name)

        async def ack_surely() -> None:
            try:
                await retrying("acknowledging a finished job", ack)
            except ResponseError:  # NOGROUP: Redis was emptied, and the message went with it
                pass

        return ack_surely

    async def declare(self) -> None:
        await self._declare_consumer_group()

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        backoff = redis_backoff()
        while True:
            try:
                async for message in super().listen():
                    backoff.reset()
                    yield message
            except UNAVAILABLE as err:
                log.warning(
                    "Redis is unavailable while waiting for jobs (%s); retrying in %.0f s.", why(err), backoff.delay
                )
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                log.warning("Redis has no job stream (restarted empty?); creating it again.")
            await backoff.wait()
            try:
                await self.declare()
            except UNAVAILABLE:
                pass  # the next read says so
