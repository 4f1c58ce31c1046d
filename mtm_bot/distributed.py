"""The bot's side of distributed mode: `RemoteRunner` hands jobs to GPU worker processes
(mtm_bot.gpu_worker) through taskiq + Redis and turns their events back into outcomes for the scheduler
(mtm_bot.worker), which keeps the store, the fair order, the limits and delivery exactly as in one process.

How nothing is lost and nothing is delivered twice:
- a job is handed out only for a free slot of a live worker (heartbeats), with its files as blobs and an
  attempt number; a worker runs an order only while it is the job's current attempt (`<p>:attempt:<job>`),
  and the bot applies only events of the current attempt;
- a worker that stops beating for 3 heartbeats is dead: its jobs are handed out again at once (attempt+1),
  however long they had been running (taskiq's idle-time redelivery is off: taskiq-redis#101);
- events are read in a consumer group and a job's final event is acknowledged only after the store has the
  outcome: after a bot crash, the unacknowledged events are read again and applied once (the store's state
  decides), and jobs still running on workers are taken up, not run again;
- Redis emptied (restarted): the bot notices its epoch key gone, creates the streams again and, after a
  heartbeat grace, hands out again every job in flight that no live worker says it holds.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from redis.exceptions import ResponseError
from taskiq.kicker import AsyncKicker

from . import metrics
from .jobs import Job, JobState, JobStore
from .progress import Progress
from .protocol import (HEARTBEATS_TO_DEATH, MAX_ATTEMPTS, PROTOCOL_VERSION, RESULT_SUFFIXES, TASK_NAME, UNREACHABLE,
                       JobStream, Keys, connect, retrying, why)
from .runner import UNEXPECTED_MESSAGE, JobEvents, Outcome
from .settings import Settings

log = logging.getLogger(__name__)

BOT_CONSUMER = "bot"
LOST_TOO_OFTEN = ("Job {id} stopped {n} times because the GPU worker running it went away; it was not tried again. "
                  "Please try a shorter duration, or try again later.")
FILES_GONE = "The files of job {id} are no longer stored; please submit it again."


@dataclass
class WorkerInfo:
    id: str
    name: str
    capacity: int
    running: list[str]  # job ids
    compatible: bool  # speaks this bot's protocol version


@dataclass
class _Beat:
    """A worker's last heartbeat."""
    id: str
    name: str
    capacity: int
    running: dict[str, int]  # job id -> the attempt it runs
    compatible: bool


@dataclass
class _Flight:
    """A job handed to the GPU workers, until its outcome is stored."""
    job: Job
    events: JobEvents
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    holder: str | None = None  # the worker id that said it runs the current attempt
    suspect_since: float | None = None  # when it became unclear whether any worker still has it
    outcome_event: str | None = None  # the event to acknowledge once the store has the outcome
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class RemoteRunner:
    keeps_running = True  # GPU workers go on while the bot restarts

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.keys = Keys(settings.broker_prefix)
        self.redis = connect(settings)
        self.broker = JobStream(settings, consumer_name=BOT_CONSUMER)
        self.kicker = AsyncKicker(task_name=TASK_NAME, broker=self.broker, labels={})
        self.grace_seconds = (HEARTBEATS_TO_DEATH + 1) * settings.heartbeat_seconds
        self._flights: dict[str, _Flight] = {}
        self._workers: dict[str, _Beat] = {}
        self._told_incompatible: set[str] = set()
        self._epoch: str | None = None
        self._capacity_changed: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self._workers.values() if w.compatible)

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self, capacity_changed: Callable[[], None]) -> None:
        self._capacity_changed = capacity_changed
        await retrying("setting up the streams", self._declare)
        self._epoch = (await self.redis.get(self.keys.epoch) or b"").decode() or None
        if self._epoch is None:
            await self._new_epoch()
        await self._check_workers()
        self._tasks = [asyncio.create_task(self._monitor(), name="mtm-monitor"),
                       asyncio.create_task(self._read_events(), name="mtm-events")]

    async def _declare(self) -> None:
        await self.broker.declare()
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.keys.events, self.keys.bot_group, id="0", mkstream=True)

    async def _new_epoch(self) -> None:
        self._epoch = secrets.token_hex(8)
        await self.redis.set(self.keys.epoch, self._epoch)

    def interrupt(self) -> None:
        pass  # the workers' jobs go on; the next start takes them up

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.broker.shutdown()
        await self.redis.aclose()

    # The scheduler's requests -----------------------------------------------------------------------

    async def run(self, job: Job, events: JobEvents, *, adopt: bool = False) -> Outcome:
        flight = self._flights[job.id] = _Flight(job, events)
        try:
            if adopt:  # whether a worker still has it shows within a heartbeat grace
                flight.suspect_since = time.monotonic()
            else:
                await self._hand_out(flight)
            while True:
                lost = asyncio.create_task(flight.lost.wait())
                await asyncio.wait([flight.outcome, lost], return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                if flight.outcome.done():
                    return flight.outcome.result()
                flight.lost.clear()
                await self._hand_out(flight)
        except BaseException:
            if not flight.outcome.done():  # the bot is stopping: the job stays with its worker
                del self._flights[job.id]
            raise

    async def settled(self, job: Job) -> None:
        flight = self._flights.pop(job.id, None)
        if flight is None:
            return
        await self._forget(job.id, flight.job.attempt, flight.outcome_event)

    def cancel(self, job_id: str) -> None:
        async def publish() -> None:
            await retrying("cancelling a job", lambda: self.redis.set(self.keys.cancelled(job_id), 1, ex=3600))
            await retrying("cancelling a job", lambda: self.redis.publish(self.keys.cancel_channel, job_id))

        task = asyncio.create_task(publish())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def where(self, job_id: str) -> str | None:
        flight = self._flights.get(job_id)
        worker = self._workers.get(flight.holder) if flight and flight.holder else None
        return worker.name if worker else None

    def workers(self) -> list[WorkerInfo]:
        """The live workers, each with what it runs: the unfinished jobs its last heartbeat listed (a heartbeat
        may be older than the job's end) and those it said it started since."""
        held: dict[str, set[str]] = {}
        for job_id, flight in self._flights.items():
            if flight.holder is not None:
                held.setdefault(flight.holder, set()).add(job_id)
        return sorted((WorkerInfo(w.id, w.name, w.capacity,
                                  sorted({j for j in w.running if j in self._flights} | held.get(w.id, set())),
                                  w.compatible) for w in self._workers.values()), key=lambda w: w.name)

    # Handing out ------------------------------------------------------------------------------

    async def _hand_out(self, flight: _Flight) -> None:
        job = flight.job
        if job.attempt >= MAX_ATTEMPTS:
            log.error("Job %s lost its worker %d times; failing it", job.id, job.attempt)
            flight.outcome.set_result(Outcome(JobState.FAILED, error=LOST_TOO_OFTEN.format(id=job.id, n=job.attempt)))
            return
        inputs = self.store.input_files(job)
        if any(not path.exists() for path in inputs.values()):
            flight.outcome.set_result(Outcome(JobState.FAILED, error=FILES_GONE.format(id=job.id)))
            return
        previous = job.attempt
        job.attempt += 1
        await self.store.update(job)
        flight.holder, flight.suspect_since = None, None
        ttl_ms = int(self.settings.blob_ttl_hours * 3600 * 1000)
        blobs = {role: await asyncio.to_thread(path.read_bytes) for role, path in inputs.items()}
        order = {"v": PROTOCOL_VERSION, "attempt": job.attempt,
                 "job": {"id": job.id, "kind": job.kind.value, "instruction": job.instruction,
                         "duration": job.duration, "seed": job.seed, "redo_from": job.redo_from,
                         "parent_id": job.parent_id},
                 "inputs": {role: path.suffix.lower() for role, path in inputs.items()}}

        async def send() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for role, data in blobs.items():
                    pipe.set(self.keys.blob(job.id, job.attempt, role), data, px=ttl_ms)
                pipe.set(self.keys.attempt(job.id), job.attempt)
                if previous:  # the earlier attempt's files and results: nobody takes them any more
                    pipe.delete(*self._blob_keys(job.id, previous))
                await pipe.execute()
            await self.kicker.kiq(order)

        await retrying(f"handing out job {job.id}", send, lambda: self._closing)
        log.info("Handed out job %s (attempt %d)", job.id, job.attempt)

    def _lose(self, flight: _Flight, why_lost: str) -> None:
        if not flight.outcome.done() and not flight.lost.is_set():
            log.warning("Job %s (attempt %d) %s; handing it out again", flight.job.id, flight.job.attempt, why_lost)
            flight.lost.set()

    # Watching the workers ---------------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._check_workers()
            except UNREACHABLE as err:
                log.warning("Cannot reach Redis (%s); retrying in %.0f s.", why(err), self.settings.heartbeat_seconds)
            except Exception:
                log.exception("Checking the GPU workers failed")

    async def _check_workers(self) -> None:
        epoch = await self.redis.get(self.keys.epoch)
        if epoch is None or epoch.decode() != self._epoch:
            log.warning("Redis lost its data (restarted empty?): creating the streams again; jobs in flight that no "
                        "worker still holds are handed out again.")
            await self._declare()
            await self._new_epoch()
            for flight in self._flights.values():
                flight.suspect_since = time.monotonic()
        before = self.capacity
        self._workers = await self._read_heartbeats()
        metrics.LIVE_WORKERS.set(len(self._workers))
        held = {job_id: (worker.id, attempt) for worker in self._workers.values()
                for job_id, attempt in worker.running.items()}
        now = time.monotonic()
        for job_id, flight in self._flights.items():
            holder = held.get(job_id)
            if holder is not None and holder[1] == flight.job.attempt:
                flight.holder, flight.suspect_since = holder[0], None
            elif flight.holder is not None and flight.holder not in self._workers:
                self._lose(flight, f"lost its GPU worker {flight.holder}")
            elif flight.suspect_since is not None and now - flight.suspect_since > self.grace_seconds:
                self._lose(flight, "is held by no live GPU worker")
        await self._reclaim_from_the_dead()
        if self.capacity != before:
            log.info("GPU workers: %d live, %d slot(s)", len(self._workers), self.capacity)
            self._capacity_changed()

    async def _read_heartbeats(self) -> dict[str, "_Beat"]:
        keys = [key async for key in self.redis.scan_iter(match=self.keys.worker("*"), count=100)]
        workers = {}
        for raw in (await self.redis.mget(keys) if keys else []):
            if raw is None:
                continue
            beat = json.loads(raw)
            info = _Beat(str(beat["id"]), str(beat.get("name", beat["id"])), int(beat.get("capacity", 1)),
                         {str(j): int(a) for j, a in beat.get("running", [])}, beat.get("v") == PROTOCOL_VERSION)
            if not info.compatible and info.id not in self._told_incompatible:
                self._told_incompatible.add(info.id)
                log.error("GPU worker %s speaks protocol version %s, this bot version %d: it gets no jobs. Run the "
                          "same MTM Bot release on the bot and its workers.", info.name, beat.get("v"), PROTOCOL_VERSION)
            workers[info.id] = info
        return workers

    async def _reclaim_from_the_dead(self) -> None:
        """Orders a worker took and then died with before its heartbeat said so: claim, acknowledge, hand out again."""
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.jobs, self.keys.workers_group)
        except ResponseError:  # no stream or group yet
            return
        for consumer in consumers:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name in self._workers or name == BOT_CONSUMER:
                continue
            if consumer["pending"]:
                pending = await self.redis.xpending_range(self.keys.jobs, self.keys.workers_group, min="-", max="+",
                                                          count=100, consumername=name)
                ids = [entry["message_id"] for entry in pending]
                claimed = await self.redis.xclaim(self.keys.jobs, self.keys.workers_group, BOT_CONSUMER,
                                                  min_idle_time=0, message_ids=ids)
                for _, message in claimed:
                    order = self.broker.formatter.loads(message[b"data"]).args[0]
                    flight = self._flights.get(order["job"]["id"])
                    if flight is not None and order["attempt"] == flight.job.attempt:
                        self._lose(flight, f"was taken by GPU worker {name}, which died")
                await self.redis.xack(self.keys.jobs, self.keys.workers_group, *ids)
            await self.redis.xgroup_delconsumer(self.keys.jobs, self.keys.workers_group, name)

    # Events from the workers --------------------------------------------------------------------

    async def _read_events(self) -> None:
        """Apply the workers' events. First (and again after Redis went away mid-way) this consumer's pending
        ones, those read but never acknowledged, page by page; then new ones (">")."""
        start = "0"
        delay = 1.0
        while True:
            try:
                reply = await self.redis.xreadgroup(self.keys.bot_group, BOT_CONSUMER, {self.keys.events: start},
                                                    count=100, block=1000)
                delay = 1.0
            except UNREACHABLE as err:
                log.warning("Lost Redis while reading events (%s); retrying in %.0f s.", why(err), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                await asyncio.sleep(self.settings.heartbeat_seconds)  # _check_workers creates it again
                continue
            entries = [entry for _, stream_entries in reply for entry in stream_entries]
            backlog = start != ">"
            if backlog and not entries:
                start = ">"
            for event_id, fields in entries:
                message = None
                try:
                    message = json.loads(fields[b"data"])
                    await self._apply(event_id.decode(), message)
                except UNREACHABLE as err:  # applied again from the pending ones: _apply repeats harmlessly
                    log.warning("Lost Redis while applying events (%s); retrying in %.0f s.", why(err), delay)
                    await asyncio.sleep(delay)
                    start = "0"
                    break
                except Exception:  # e.g. the disk is full: this job fails with a sentence, the others go on
                    log.exception("Dropping an event the bot could not apply")
                    await self.redis.xack(self.keys.events, self.keys.bot_group, event_id)
                    flight = self._flights.get(str(message.get("job"))) if isinstance(message, dict) else None
                    if flight is not None and not flight.outcome.done():
                        flight.outcome.set_result(Outcome(JobState.FAILED,
                                                          error=UNEXPECTED_MESSAGE.format(id=flight.job.id)))
            else:
                if backlog and entries:
                    start = entries[-1][0].decode()  # page through the backlog

    async def _apply(self, event_id: str, message: dict) -> None:
        job_id, attempt, kind = str(message.get("job")), int(message.get("attempt", 0)), message.get("type")
        flight = self._flights.get(job_id)
        if message.get("v") != PROTOCOL_VERSION or flight is None or attempt != flight.job.attempt \
                or flight.outcome.done():
            # stale (an earlier attempt, a job already stored), or from a worker of another version
            await self.redis.xack(self.keys.events, self.keys.bot_group, event_id)
            if kind == JobState.DONE.value and (flight is None or attempt != flight.job.attempt):
                await self._delete_blobs(job_id, attempt, results_only=True)
            return
        flight.holder = str(message.get("worker")) or flight.holder
        terminal = kind in (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)
        if kind == "progress":
            flight.events.progress(Progress(str(message["stage"]), int(message["block"]), int(message["blocks"]),
                                            int(message["step"]), int(message["steps"])))
        elif kind == "captions":
            flight.events.captions([str(line) for line in message["lines"]])
        elif kind == "released":
            self._lose(flight, f"was handed back by GPU worker {message.get('worker')}")
        elif terminal:
            outcome = await self._outcome(flight.job, JobState(kind), message)
            if outcome is None:
                self._lose(flight, "finished, but its result expired in Redis")
            else:
                flight.outcome_event = event_id  # acknowledged once the store has the outcome (settled)
                flight.outcome.set_result(outcome)
                return
        await self.redis.xack(self.keys.events, self.keys.bot_group, event_id)

    async def _outcome(self, job: Job, state: JobState, message: dict) -> Outcome | None:
        if state is not JobState.DONE:
            return Outcome(state, error=message.get("error"))
        wanted = self.store.result_files(job)
        results = message.get("results") or {}
        for suffix, path in wanted.items():
            if suffix not in RESULT_SUFFIXES or suffix not in results:
                return None
            data = await self.redis.get(self.keys.blob(job.id, job.attempt, "result" + suffix))
            if data is None:
                return None
            partial = path.with_name(path.name + ".part")
            await asyncio.to_thread(partial.write_bytes, data)
            await asyncio.to_thread(partial.replace, path)
        return Outcome(JobState.DONE, result_json=message.get("result_json"))

    async def _forget(self, job_id: str, attempt: int, event_id: str | None) -> None:
        async def clean() -> None:
            if event_id is not None:
                await self.redis.xack(self.keys.events, self.keys.bot_group, event_id)
            await self.redis.delete(self.keys.attempt(job_id))
            await self._delete_blobs(job_id, attempt)

        await retrying("tidying up a finished job", clean, lambda: self._closing)

    async def _delete_blobs(self, job_id: str, attempt: int, results_only: bool = False) -> None:
        await self.redis.delete(*self._blob_keys(job_id, attempt, results_only))

    def _blob_keys(self, job_id: str, attempt: int, results_only: bool = False) -> list[str]:
        names = [f"result{suffix}" for suffix in RESULT_SUFFIXES]
        if not results_only:
            names += ["clip", "image", "parent_track", "parent_state"]
        return [self.keys.blob(job_id, attempt, name) for name in names]
