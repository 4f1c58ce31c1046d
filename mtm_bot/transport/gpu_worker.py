"""`python -m mtm_bot worker`: one GPU worker of a distributed bot (MTM_BROKER_URL), one per GPU
(MTM_DEVICE=cuda:N), on any machine that reaches Redis. No shared disk: a job's files come and go
through Redis (mtm_bot.transport.protocol); the worker keeps them in a scratch folder only while the job runs.

It loads the pipeline once (a worker that cannot load its models exits before it takes any job), then
takes up to settings.max_batch jobs at once, each only while it has a free slot, streams progress and
the refined captions back as they come, and hands the result back. SIGTERM or Ctrl-C hands the running
jobs back to the bot, which gives them to another worker at once. A job that reports no progress for
MTM_STALL_SECONDS means the GPU under it hangs: the worker stops beating and exits with status 3 (STUCK_EXIT)
without waiting for it, so the bot gives its jobs to another worker and a supervisor can restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from taskiq.acks import AcknowledgeType
from taskiq.api import run_receiver_task

from ..core import metrics
from ..core.errors import MTMError
from ..core.progress import CancelToken, Progress
from ..core.settings import Settings
from ..jobs.job import Job, JobState
from ..jobs.runner import JobRunner, Outcome, Stalled, execute_watched
from ..jobs.store import JobFiles
from .blobs import Blobs
from .protocol import (
    HEARTBEATS_TO_DEATH,
    PROTOCOL_VERSION,
    TASK_NAME,
    UNAVAILABLE,
    Event,
    EventType,
    Heartbeat,
    JobStream,
    Keys,
    Order,
    OtherVersion,
    connect,
    encode,
    redis_backoff,
    retrying,
    safe_url,
    wait_for_redis,
    why,
)

log = logging.getLogger("mtm_bot.transport.gpu_worker")

NO_BROKER = (
    "MTM_BROKER_URL is not set: a GPU worker takes its jobs from the bot's Redis. Set it to the URL the "
    "bot uses, e.g. MTM_BROKER_URL=redis://127.0.0.1:6379/0, then start the worker again."
)
PROGRESS_EVERY_S = 0.25  # progress events per job at most this often (block changes always go out)
STUCK_EXIT = 3  # the worker's exit status when a job of its stopped making progress


@dataclass
class _Taken:
    attempt: int
    token: CancelToken
    cancelled_by_user: bool = False


class GpuWorker:
    def __init__(self, settings: Settings, runner: JobRunner, name: str | None = None) -> None:
        self.settings = settings
        self.runner = runner
        self.files = runner.files
        self.name = name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.id = f"{self.name}/{secrets.token_hex(3)}"  # this process: a restarted worker is a new consumer
        self.keys = Keys(settings.broker_prefix)
        self.capacity = settings.max_batch
        self.redis = connect(settings)
        self.blobs = Blobs(self.redis, self.keys, settings)
        self.broker = JobStream(settings, consumer_name=self.id)

        async def run_job(order: dict) -> None:  # taskiq renames what it registers: a function, not a method
            await self.run_job(order)

        self.broker.register_task(run_job, task_name=TASK_NAME)
        self._executor = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix="mtm-job")
        self._taken: dict[str, _Taken] = {}
        self._stuck = asyncio.Event()  # a job's thread hangs: leave without it (run_job)
        self._outbox: asyncio.Queue[tuple[Event, asyncio.Future | None]] = asyncio.Queue()

    # Life cycle ---------------------------------------------------------------------------------

    async def serve(self, stopping: asyncio.Event) -> bool:
        """Take jobs until `stopping` is set (True), or until a job stops making progress (False: this worker
        left without it, and the thread running it may never return)."""
        if not await wait_for_redis(self.settings, "GPU worker", stopping):
            return True
        await retrying("creating the job stream", self.broker.startup)
        tasks = [
            asyncio.create_task(coroutine)
            for coroutine in (self._beat(), self._listen_for_cancels(), self._send_events())
        ]
        await self.heartbeat()  # alive (and free) before the first read
        log.info(
            "GPU worker %s ready: %d slot(s), Redis at %s", self.id, self.capacity, safe_url(self.settings.broker_url)
        )
        receiver = asyncio.create_task(
            run_receiver_task(
                self.broker,
                max_async_tasks=self.capacity,
                max_prefetch=0,
                ack_time=AcknowledgeType.WHEN_EXECUTED,
                run_startup=False,
                sync_workers=1,
            )
        )
        waits = [asyncio.create_task(stopping.wait()), asyncio.create_task(self._stuck.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if self._stuck.is_set():
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            await self._leave(tasks)
            return False
        await self.stop(receiver, tasks)
        return True

    async def stop(self, receiver: asyncio.Task, tasks: list[asyncio.Task]) -> None:
        """Hand the running jobs back (released: the bot gives them to another worker) and leave."""
        receiver.cancel()  # first: a job handed back must not come straight back here
        await asyncio.gather(receiver, return_exceptions=True)
        for taken in self._taken.values():
            taken.token.cancel()
        deadline = time.monotonic() + 30
        while self._taken and time.monotonic() < deadline:  # each job posts "released" (run_job)
            await asyncio.sleep(0.05)
        await self._outbox.join()
        await self._leave(tasks)

    async def _leave(self, tasks: list[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*UNAVAILABLE):
            await self.redis.delete(self.keys.worker(self.id))
        await self.broker.shutdown()
        await self.redis.aclose()
        self._executor.shutdown(wait=False)

    async def heartbeat(self) -> None:
        beat = Heartbeat(
            self.id,
            self.name,
            self.capacity,
            {job_id: taken.attempt for job_id, taken in self._taken.items()},
            self.settings.device,
        )
        ttl_ms = int(HEARTBEATS_TO_DEATH * self.settings.heartbeat_seconds * 1000)
        await self.redis.set(self.keys.worker(self.id), encode(beat), px=ttl_ms)

    async def _beat(self) -> None:
        while True:
            try:
                await self.heartbeat()
                for job_id, taken in list(self._taken.items()):  # a cancel published while we were away
                    if await self.redis.exists(self.keys.cancelled(job_id)):
                        taken.cancelled_by_user = True
                        taken.token.cancel()
            except UNAVAILABLE as err:
                log.warning("Redis is unavailable (%s); still working, retrying.", why(err))
            await asyncio.sleep(self.settings.heartbeat_seconds)

    async def _listen_for_cancels(self) -> None:
        backoff = redis_backoff()
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.cancel_channel)
                    backoff.reset()
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        taken = self._taken.get(message["data"].decode())
                        if taken is not None:
                            taken.cancelled_by_user = True
                            taken.token.cancel()  # the job stops at its next decode step
            except UNAVAILABLE:
                await backoff.wait()  # _beat says that Redis is gone

    async def _send_events(self) -> None:
        """One sender, so the bot reads a job's events in the order they happened."""
        while True:
            event, sent = await self._outbox.get()
            try:
                await retrying(
                    "sending an event",
                    lambda: self.redis.xadd(
                        self.keys.events, {b"data": encode(event)}, maxlen=100_000, approximate=True
                    ),
                )
                if sent is not None and not sent.done():
                    sent.set_result(None)
            finally:
                self._outbox.task_done()

    async def post(self, kind: EventType, job_id: str, attempt: int, *, wait: bool = False, **fields) -> None:
        sent = asyncio.get_running_loop().create_future() if wait else None
        self._outbox.put_nowait((Event(kind, job_id, attempt, self.id, **fields), sent))
        if sent is not None:
            await sent

    # One job ------------------------------------------------------------------------------------

    async def run_job(self, message: dict) -> None:
        """taskiq calls this for each message; the message is acknowledged when it returns."""
        try:
            order = Order.from_json(message)
        except OtherVersion as other:
            log.error(
                "Refusing job %s: its order speaks protocol version %s, this worker version %d. Run the same "
                "MTM Bot release on the bot and on its GPU workers.",
                other.job_id,
                other.version,
                PROTOCOL_VERSION,
            )
            await self.post(
                EventType.RELEASED,
                other.job_id,
                other.attempt,
                wait=True,
                reason=f"protocol version {PROTOCOL_VERSION}",
            )
            return
        except (KeyError, TypeError, ValueError) as err:
            log.error("Refusing a malformed job order (%s)", why(err))
            return
        job, attempt = order.job(self.files), order.attempt
        current = await retrying("checking a job", lambda: self.redis.get(self.keys.attempt(job.id)))
        if current is None or int(current) != attempt:
            log.info("Skipping job %s attempt %d: the bot has handed it out again since", job.id, attempt)
            return
        taken = self._taken[job.id] = _Taken(attempt, CancelToken())
        log.info("Running job %s (attempt %d)", job.id, attempt)
        try:
            await self.heartbeat()  # the bot sees at once that this worker holds the job
            await self.post(EventType.STARTED, job.id, attempt)
            if await self.redis.exists(self.keys.cancelled(job.id)):
                taken.cancelled_by_user = True
                taken.token.cancel()
            try:
                outcome = await self._execute(job, order, taken)
            except Stalled as stalled:
                await self._leave_stuck(stalled)
            if outcome is None or (outcome.state is JobState.CANCELLED and not taken.cancelled_by_user):
                log.info("Handing job %s back (%s)", job.id, "its files expired" if outcome is None else "stopping")
                await self.post(EventType.RELEASED, job.id, attempt, wait=True)  # another worker runs it
                return
            results = None
            if outcome.state is JobState.DONE:
                results = await self.blobs.put_results(job.id, attempt, self.files.result_files(job))
            await self.post(
                EventType(outcome.state.value),
                job.id,
                attempt,
                wait=True,
                result_json=outcome.result_json,
                error=outcome.error,
                results=results,
            )
            log.info("Finished job %s (attempt %d): %s", job.id, attempt, outcome.state.value)
        except Exception:
            log.exception("Job %s attempt %d broke this worker's side; handing it back", job.id, attempt)
            await self.post(EventType.RELEASED, job.id, attempt, wait=True)
        finally:
            del self._taken[job.id]
            for folder in (self.files.inputs_dir, self.files.outputs_dir):
                for path in folder.glob(f"{job.id}*"):
                    path.unlink(missing_ok=True)
            with contextlib.suppress(*UNAVAILABLE):
                await self.heartbeat()

    async def _leave_stuck(self, stalled: Stalled) -> NoReturn:
        """A job's thread hangs: have serve leave without it, holding the job's slot until then (cancelled with
        the receiver) so that no other order comes in."""
        log.error(
            "%s: this worker is stuck (a hung GPU call?). Leaving without it, so that the bot hands its jobs to "
            "another worker.",
            stalled,
        )
        self._stuck.set()
        while True:
            await asyncio.sleep(3600)

    async def _execute(self, job: Job, order: Order, taken: _Taken) -> Outcome | None:
        """Fetch the inputs, run the job in a job thread; None if its inputs are gone from Redis."""
        attempt = order.attempt
        paths = self.files.input_files(job)
        for role in order.inputs:
            if role not in paths:
                raise ValueError(f"unknown input {role}")
            if not await self.blobs.fetch_input(job.id, attempt, role, paths[role]):
                log.warning("The %s of job %s expired in Redis; handing the job back", role, job.id)
                return None
        loop = asyncio.get_running_loop()
        last_sent: dict[str, Any] = {"at": 0.0, "where": None}  # the last progress event sent: when, (stage, block)

        def report(progress: Progress) -> None:  # in the job thread
            now, where = time.monotonic(), (progress.stage, progress.block)
            if now - last_sent["at"] >= PROGRESS_EVERY_S or where != last_sent["where"]:
                last_sent.update(at=now, where=where)
                loop.call_soon_threadsafe(
                    self._post_soon, Event(EventType.PROGRESS, job.id, attempt, self.id, progress=progress)
                )

        def captions(lines: list[str]) -> None:
            loop.call_soon_threadsafe(
                self._post_soon, Event(EventType.CAPTIONS, job.id, attempt, self.id, lines=list(lines))
            )

        return await execute_watched(
            self._executor, self.runner.execute, job, report, taken.token, captions, self.settings.stall_seconds
        )

    def _post_soon(self, event: Event) -> None:
        self._outbox.put_nowait((event, None))


def main(settings: Settings) -> int:
    if not settings.broker_url:
        print(NO_BROKER, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack, to stderr
    logging.getLogger("taskiq").setLevel(
        logging.ERROR
    )  # its cancel-at-exit warning is noise; our listener logs Redis trouble
    try:
        status = asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        return 0
    if status == STUCK_EXIT:  # the stuck job's thread cannot be joined: a normal exit would wait for it for ever
        logging.shutdown()
        os._exit(STUCK_EXIT)
    return status


async def _serve(settings: Settings) -> int:
    from ..stages.pipeline import Pipeline

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stopping.set)
    scratch = Path(tempfile.mkdtemp(prefix="mtm-worker-"))
    try:
        log.info("loading the %s models on %s (once; they stay resident)", settings.profile, settings.device)
        try:
            pipeline = await asyncio.to_thread(lambda: Pipeline(settings).load())
        except MTMError as err:
            log.error("This worker cannot load its models, so it takes no job: %s", err)
            return 1
        except Exception:
            log.exception("This worker cannot load its models, so it takes no job")
            return 1
        files = JobFiles(scratch)
        files.make_folders()
        metrics.serve(settings.metrics_port)
        return 0 if await GpuWorker(settings, JobRunner(pipeline, files)).serve(stopping) else STUCK_EXIT
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
