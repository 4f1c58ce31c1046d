"""The bot's side of distributed mode: `RemoteRunner` hands jobs to GPU worker processes
(mtm_bot.transport.gpu_worker) through taskiq + Redis and turns their events back into outcomes for the scheduler
(mtm_bot.jobs.scheduler), which keeps the store, the fair order, the limits and delivery exactly as in one process.

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
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import ResponseError
from taskiq.kicker import AsyncKicker

from ..core import metrics
from ..core.settings import Settings
from ..jobs.job import Job, JobState
from ..jobs.runner import UNEXPECTED_MESSAGE, JobEvents, Outcome
from ..jobs.store import JobStore
from .blobs import Blobs
from .event_reader import EventReader
from .heartbeats import BOT_CONSUMER, WorkerWatch
from .protocol import (
    HEARTBEATS_TO_DEATH,
    MAX_ATTEMPTS,
    TASK_NAME,
    UNAVAILABLE,
    Event,
    EventType,
    JobStream,
    Keys,
    Order,
    OtherVersion,
    connect,
    retrying,
    why,
)

log = logging.getLogger(__name__)

LOST_TOO_OFTEN = (
    "Job {id} stopped {n} times because the GPU worker running it went away; it was not tried again. "
    "Please try a shorter duration, or try again later."
)
FILES_GONE = "The files of job {id} are no longer stored; please submit it again."


@dataclass
class WorkerInfo:
    id: str
    name: str
    capacity: int
    running: list[str]  # job ids
    compatible: bool  # speaks this bot's protocol version


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


class HandOut:
    """Gives one attempt of a job to the GPU workers: its input blobs and its attempt number in one
    transaction (an earlier attempt's blobs go with it), then the order on the job stream."""

    def __init__(self, settings: Settings, keys: Keys, blobs: Blobs) -> None:
        self.keys = keys
        self.blobs = blobs
        self.broker = JobStream(settings, consumer_name=BOT_CONSUMER)
        self.kicker = AsyncKicker(task_name=TASK_NAME, broker=self.broker, labels={})

    async def send(self, order: Order, inputs: dict, previous: int) -> None:
        async with self.blobs.redis.pipeline(transaction=True) as pipe:
            self.blobs.put_inputs(pipe, order.job_id, order.attempt, inputs)
            pipe.set(self.keys.attempt(order.job_id), order.attempt)
            if previous:  # the earlier attempt's files and results: nobody takes them any more
                pipe.delete(*self.blobs.names(order.job_id, previous))
            await pipe.execute()
        await self.kicker.kiq(order.to_json())


class RemoteRunner:
    """The scheduler's transport in distributed mode: which job is where, and when it must go out again. It
    composes the hand-out (HandOut), the workers' heartbeats (WorkerWatch), their events (EventReader) and the
    files in transit (Blobs)."""

    keeps_running = True  # GPU workers go on while the bot restarts

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.keys = Keys(settings.broker_prefix)
        self.redis = connect(settings)
        self.blobs = Blobs(self.redis, self.keys, settings)
        self.handout = HandOut(settings, self.keys, self.blobs)
        self.watch = WorkerWatch(self.redis, self.keys, self.handout.broker)
        self.events = EventReader(self.redis, self.keys, no_group_wait=settings.heartbeat_seconds)
        self.grace_seconds = (HEARTBEATS_TO_DEATH + 1) * settings.heartbeat_seconds
        self._flights: dict[str, _Flight] = {}
        self._epoch: str | None = None
        self._capacity_changed: Callable[[], None] = lambda: None
        self._tasks: list[asyncio.Task] = []
        self._closing = asyncio.Event()

    @property
    def capacity(self) -> int:
        return self.watch.capacity

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self, capacity_changed: Callable[[], None]) -> None:
        self._capacity_changed = capacity_changed
        await retrying("setting up the streams", self._declare)
        self._epoch = (await self.redis.get(self.keys.epoch) or b"").decode() or None
        if self._epoch is None:
            await self._new_epoch()
        await self._check_workers()
        self._tasks = [
            asyncio.create_task(self._monitor(), name="mtm-monitor"),
            asyncio.create_task(self.events.read(self._apply, self._broken), name="mtm-events"),
        ]

    async def _declare(self) -> None:
        await self.handout.broker.declare()
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.keys.events, self.keys.bot_group, id="0", mkstream=True)

    async def _new_epoch(self) -> None:
        self._epoch = secrets.token_hex(8)
        await self.redis.set(self.keys.epoch, self._epoch)

    def interrupt(self) -> None:
        pass  # the workers' jobs go on; the next start takes them up

    async def close(self) -> None:
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.handout.broker.shutdown()
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
        worker = self.watch.live.get(flight.holder) if flight and flight.holder else None
        return worker.name if worker else None

    def workers(self) -> list[WorkerInfo]:
        """The live workers, each with what it runs: the unfinished jobs its last heartbeat listed (a heartbeat
        may be older than the job's end) and those it said it started since."""
        held: dict[str, set[str]] = {}
        for job_id, flight in self._flights.items():
            if flight.holder is not None:
                held.setdefault(flight.holder, set()).add(job_id)
        return sorted(
            (
                WorkerInfo(
                    w.id,
                    w.name,
                    w.capacity,
                    sorted({j for j in w.running if j in self._flights} | held.get(w.id, set())),
                    w.compatible,
                )
                for w in self.watch.live.values()
            ),
            key=lambda w: w.name,
        )

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
        data = {role: await asyncio.to_thread(path.read_bytes) for role, path in inputs.items()}
        order = Order.of(job, inputs)
        await retrying(f"handing out job {job.id}", lambda: self.handout.send(order, data, previous), self._closing)
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
            except UNAVAILABLE as err:
                log.warning("Cannot reach Redis (%s); retrying in %.0f s.", why(err), self.settings.heartbeat_seconds)
            except Exception:
                log.exception("Checking the GPU workers failed")

    async def _check_workers(self) -> None:
        epoch = await self.redis.get(self.keys.epoch)
        if epoch is None or epoch.decode() != self._epoch:
            log.warning(
                "Redis lost its data (restarted empty?): creating the streams again; jobs in flight that no "
                "worker still holds are handed out again."
            )
            await self._declare()
            await self._new_epoch()
            for flight in self._flights.values():
                flight.suspect_since = time.monotonic()
        before = self.capacity
        await self.watch.read()
        metrics.LIVE_WORKERS.set(len(self.watch.live))
        held = {
            job_id: (beat.id, attempt) for beat in self.watch.live.values() for job_id, attempt in beat.running.items()
        }
        now = time.monotonic()
        for job_id, flight in self._flights.items():
            holder = held.get(job_id)
            if holder is not None and holder[1] == flight.job.attempt:
                flight.holder, flight.suspect_since = holder[0], None
            elif flight.holder is not None and flight.holder not in self.watch.live:
                self._lose(flight, f"lost its GPU worker {flight.holder}")
            elif flight.suspect_since is not None and now - flight.suspect_since > self.grace_seconds:
                self._lose(flight, "is held by no live GPU worker")
        for worker, order in await self.watch.reclaim_from_the_dead():
            taken = self._flights.get(order.job_id)
            if taken is not None and order.attempt == taken.job.attempt:
                self._lose(taken, f"was taken by GPU worker {worker}, which died")
        if self.capacity != before:
            log.info("GPU workers: %d live, %d slot(s)", len(self.watch.live), self.capacity)
            self._capacity_changed()

    # Events from the workers --------------------------------------------------------------------

    async def _apply(self, event_id: str, message: dict) -> None:
        try:
            event = Event.from_json(message)
        except OtherVersion:  # from a worker of another version: it gets no jobs, its events are not read
            await self.events.ack(event_id)
            return
        flight = self._flights.get(event.job_id)
        if flight is None or event.attempt != flight.job.attempt or flight.outcome.done():
            # stale: an earlier attempt, or a job already stored
            await self.events.ack(event_id)
            if event.type is EventType.DONE and (flight is None or event.attempt != flight.job.attempt):
                await self.blobs.delete(event.job_id, event.attempt, results_only=True)
            return
        flight.holder = event.worker or flight.holder
        if event.type is EventType.PROGRESS and event.progress is not None:
            flight.events.progress(event.progress)
        elif event.type is EventType.CAPTIONS and event.lines is not None:
            flight.events.captions(event.lines)
        elif event.type is EventType.RELEASED:
            self._lose(flight, f"was handed back by GPU worker {event.worker}")
        elif event.outcome is not None:
            outcome = await self._outcome(flight.job, event)
            if outcome is None:
                self._lose(flight, "finished, but its result expired in Redis")
            else:
                flight.outcome_event = event_id  # acknowledged once the store has the outcome (settled)
                flight.outcome.set_result(outcome)
                return
        await self.events.ack(event_id)

    async def _broken(self, message: dict) -> None:
        """An event that could not be applied: its job fails with a sentence."""
        flight = self._flights.get(str(message.get("job")))
        if flight is not None and not flight.outcome.done():
            flight.outcome.set_result(Outcome(JobState.FAILED, error=UNEXPECTED_MESSAGE.format(id=flight.job.id)))

    async def _outcome(self, job: Job, event: Event) -> Outcome | None:
        if event.outcome is None or event.outcome is not JobState.DONE:
            return Outcome(event.outcome or JobState.FAILED, error=event.error)
        if not await self.blobs.fetch_results(job.id, job.attempt, self.store.result_files(job), event.results or {}):
            return None
        return Outcome(JobState.DONE, result_json=event.result_json)

    async def _forget(self, job_id: str, attempt: int, event_id: str | None) -> None:
        async def clean() -> None:
            if event_id is not None:
                await self.events.ack(event_id)
            await self.redis.delete(self.keys.attempt(job_id))
            await self.blobs.delete(job_id, attempt)

        await retrying("tidying up a finished job", clean, self._closing)
