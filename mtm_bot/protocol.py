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

Every order, event and heartbeat carries "v": PROTOCOL_VERSION; a worker refuses an order of another
version (it says so in its log and hands the job back) instead of misreading it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq.abc.broker import AckableMessage
from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisStreamBroker

from .settings import Settings

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
TASK_NAME = "mtm.run_job"
# Redis cannot be reached or went away mid-command: worth another try, never a traceback.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
HEARTBEATS_TO_DEATH = 3  # a worker whose heartbeat is this many intervals old is dead
MAX_ATTEMPTS = 4  # a job that loses its worker this often fails instead of killing a fifth
# What a result may carry (JobFiles.result_files); an order carries JobFiles.input_files.
RESULT_SUFFIXES = (".wav", ".kept.npz", ".mid")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")


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
        return f"{self.prefix}:blob:{job_id}:{attempt}:{name}"


def event(kind: str, job_id: str, attempt: int, worker: str, **fields: Any) -> dict:
    """started, progress, captions, finished, failed, cancelled, released (handed back: run it elsewhere)."""
    return {"v": PROTOCOL_VERSION, "type": kind, "job": job_id, "attempt": attempt, "worker": worker,
            "at": time.time(), **fields}


def check_suffix(suffix: str) -> str:
    """A file suffix from an order: short and alphanumeric, never a path."""
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"not a file suffix: {suffix[:20]!r}")
    return suffix


def safe_url(url: str) -> str:
    """The broker URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def why(err: BaseException) -> str:
    return str(err).strip() or type(err).__name__


def connect(settings: Settings) -> Redis:
    return Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_keepalive=True,
                          health_check_interval=30)


async def wait_for_redis(settings: Settings, who: str, stopping: asyncio.Event | None = None) -> bool:
    """Ping until Redis answers, one sentence per failed try and backing off; False if `stopping` was set."""
    delay = RETRY_FIRST_S
    redis = connect(settings)
    try:
        while stopping is None or not stopping.is_set():
            try:
                await redis.ping()
                return True
            except UNREACHABLE as err:
                log.warning("The %s cannot reach Redis at %s (%s); retrying in %.0f s.",
                            who, safe_url(settings.broker_url), why(err), delay)
            if stopping is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                except TimeoutError:
                    pass
            delay = min(delay * 2, RETRY_MAX_S)
        return False
    finally:
        await redis.aclose()


async def retrying(what: str, call: Callable[[], Any], stopping: Callable[[], bool] = lambda: False):
    """`await call()` until Redis answers (a line per failure, backing off); a command that must not be lost."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return await call()
        except UNREACHABLE as err:
            if stopping():
                raise
            log.warning("Redis is unreachable while %s (%s); retrying in %.0f s.", what, why(err), delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


class JobStream(RedisStreamBroker):
    """taskiq-redis's stream broker, set up for jobs that take minutes on a GPU:

    - one message per read (xread_count 1): a worker takes a job only for a free slot (taskiq's Receiver
      asks for the next message only then), so the bot's order is the order jobs start in;
    - no redelivery by idle time: taskiq-redis#101 reports XAUTOCLAIM giving a job whose worker is alive
      to another worker once it runs past idle_timeout. The bot hands out a dead worker's jobs again by
      its heartbeat instead (mtm_bot.distributed), so a slow 3-minute track never runs twice;
    - a listener and acknowledgements that outlive Redis: a lost connection or an emptied Redis (the
      stream and its group gone) is one log line and a retry, and the group is created again.
    """

    NEVER_MS = 30 * 24 * 3600 * 1000

    def __init__(self, settings: Settings, consumer_name: str) -> None:
        self.keys = Keys(settings.broker_prefix)
        super().__init__(settings.broker_url, queue_name=self.keys.jobs, consumer_group_name=self.keys.workers_group,
                         consumer_name=consumer_name, consumer_id="0", xread_count=1, xread_block=1000,
                         idle_timeout=self.NEVER_MS, unacknowledged_batch_size=1, unacknowledged_lock_timeout=5,
                         maxlen=10_000, socket_connect_timeout=5)
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
        delay = RETRY_FIRST_S
        while True:
            try:
                async for message in super().listen():
                    delay = RETRY_FIRST_S
                    yield message
            except UNREACHABLE as err:
                log.warning("Lost Redis while waiting for jobs (%s); retrying in %.0f s.", why(err), delay)
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                log.warning("Redis has no job stream (restarted empty?); creating it again.")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            try:
                await self.declare()
            except UNREACHABLE:
                pass  # the next read says so


def dumps(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()
