"""Distributed mode end to end: the real bot against the Discord emulator, real GPU worker processes
(`python -m mtm_bot worker`, tiny profile on the CPU) and the real Redis at 127.0.0.1:6379, each test under
its own key prefix. Faults that need a Redis of their own (restarted empty, unreachable) start one on a
free port from the same redis-server binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from discord_emulator import DiscordEmulator, FakeUser
from test_bot_e2e import (
    JOB_SECONDS,
    LINE,
    accepted,
    connect_bot,
    disconnect_bot,
    every_job_settled,
    results_for,
    wav_bytes,
)
from test_bot_restart import TOKEN, bot_env, start_bot

from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import JobState
from mtm_bot.jobs.store import JobStore

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("MTM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HEARTBEAT = "0.5"  # seconds: a killed worker is noticed within 1.5 s

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
def prefix():
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(
            f"No Redis answers at {REDIS_URL}: these tests need a real one. Start it with `redis-server "
            "--daemonize yes --save '' --appendonly no` (.ci/run does), or point MTM_TEST_REDIS_URL at one."
        )
    name = f"mtm-test-{secrets.token_hex(4)}"
    yield name
    with contextlib.suppress(redis.ConnectionError):
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workers:
    """GPU worker processes of one test, each logging to its own file."""

    def __init__(self, tmp_path: Path, broker_url: str, prefix: str) -> None:
        self.tmp_path, self.broker_url, self.prefix = tmp_path, broker_url, prefix
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    async def start(self, name: str, wait: bool = True, **env: str) -> asyncio.subprocess.Process:
        settings = {
            **dict(
                MTM_PROFILE="tiny",
                MTM_DEVICE="cpu",
                MTM_BROKER_URL=self.broker_url,
                MTM_BROKER_PREFIX=self.prefix,
                MTM_MAX_BATCH="1",
                MTM_HEARTBEAT_SECONDS=HEARTBEAT,
                MTM_WORKER_NAME=name,
                OMP_NUM_THREADS="1",
            ),
            **env,
        }
        with open(self.log(name), "ab") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mtm_bot",
                "worker",
                cwd=ROOT,
                env=bot_env(**settings),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = process
        if wait:
            await self.ready(name)
        return process

    async def ready(self, name: str, timeout: float = 300) -> None:
        async def is_ready() -> None:
            while "ready" not in self.log(name).read_text():
                assert self.processes[name].returncode is None, self.log(name).read_text()[-3000:]
                await asyncio.sleep(0.1)

        await asyncio.wait_for(is_ready(), timeout)

    async def print_logs(self, tail: int = 6000) -> None:
        """Each worker's log, after the stacks of every thread of the live ones (SIGUSR1: faulthandler)."""
        live = [process for process in self.processes.values() if process.returncode is None]
        for process in live:
            process.send_signal(signal.SIGUSR1)
        await asyncio.sleep(1.0 if live else 0)
        for name in self.processes:
            print(f"--- the last of {name}'s log ---\n{self.log(name).read_text(errors='replace')[-tail:]}")

    def ran(self, name: str) -> list[str]:
        """Job ids the worker started, in order."""
        return [
            line.split("Running job ")[1].split()[0]
            for line in self.log(name).read_text().splitlines()
            if "Running job " in line
        ]

    async def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        process.send_signal(signum)
        await process.wait()

    async def stop_all(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def distributed(
    tmp_path: Path, prefix: str, broker_url: str = REDIS_URL, **env: str
) -> AsyncIterator[tuple[DiscordEmulator, object, Workers]]:
    """The emulator, the bot (in this process, distributed mode) and an empty set of workers."""
    emulator = await DiscordEmulator().start()
    workers = Workers(tmp_path, broker_url, prefix)
    bot, runner = await connect_bot(
        emulator,
        tmp_path / "storage",
        MTM_BROKER_URL=broker_url,
        MTM_BROKER_PREFIX=prefix,
        MTM_HEARTBEAT_SECONDS=HEARTBEAT,
        **env,
    )
    try:
        yield emulator, bot, workers
    except BaseException:
        await workers.print_logs()  # shown with the failure: what each worker was doing
        raise
    finally:
        await workers.stop_all()
        await disconnect_bot(bot, runner)
        await emulator.stop()


async def compose(emulator: DiscordEmulator, user: FakeUser, seed: int, duration: int = 10) -> str:
    interaction = await emulator.slash(
        user,
        "compose",
        {"instruction": f"carol {seed}", "duration": duration},
        attachment=(wav_bytes(2.0, seed=seed), f"c{seed}.wav", "audio/wav"),
    )
    return await accepted(emulator, interaction)


def delivered_once(emulator: DiscordEmulator, users: list[FakeUser], job_ids: list[str]) -> None:
    results = [m for user in users for m in results_for(emulator, user)]
    for job_id in job_ids:
        mine = [m for m in results if f"`{job_id}`" in m.content]
        assert len(mine) == 1, (job_id, [m.content for m in mine])
        assert LINE.search(mine[0].text()) and len(mine[0].files) == 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_two_workers_serve_six_jobs_of_three_users_round_robin_each_delivered_once(tmp_path, prefix):
    bot_port, worker_port = free_port(), free_port()
    async with distributed(tmp_path, prefix, MTM_METRICS_PORT=str(bot_port)) as (emulator, bot, workers):
        assert bot.pipeline._generator is None and bot.pipeline._captioner is None  # the bot loads no model
        users = [emulator.user(name) for name in ("alice", "bob", "carol")]
        # Every job is queued before a worker exists: the order they start in is the bot's alone.
        jobs = [await compose(emulator, user, seed=10 * i + n) for i, user in enumerate(users) for n in range(2)]
        queue = await emulator.slash(users[0], "queue")
        await emulator.wait_for(lambda: queue.visible_messages(), 30, "/queue")
        assert "none connected" in queue.visible_messages()[-1].content
        assert metric(scrape(bot_port), "mtm_queue_length") == 6 and metric(scrape(bot_port), "mtm_live_workers") == 0
        await asyncio.gather(workers.start("gpu-a", MTM_METRICS_PORT=str(worker_port)), workers.start("gpu-b"))
        await every_job_settled(bot.store)
        delivered_once(emulator, users, jobs)
        bot_metrics, worker_metrics = scrape(bot_port), scrape(worker_port)
        assert metric(bot_metrics, "mtm_live_workers") == 2 and metric(bot_metrics, "mtm_queue_length") == 0
        assert metric(bot_metrics, 'mtm_jobs_finished_total{state="done"}') >= 6
        assert metric(worker_metrics, 'mtm_stage_seconds_count{stage="generating"}') == len(workers.ran("gpu-a"))
        assert "mtm_gpu_memory_bytes" in worker_metrics
        started = sorted([await bot.store.get(j) for j in jobs], key=lambda job: job.started_at)
        owners = {job.id: job.user_id for job in started}
        assert [owners[j.id] for j in started] == [u.id for u in users] * 2, "round-robin across users"
        assert workers.ran("gpu-a") and workers.ran("gpu-b"), "both workers did work"
        assert sorted(workers.ran("gpu-a") + workers.ran("gpu-b")) == sorted(jobs), "each job ran once"
        queue = await emulator.slash(users[0], "queue")
        await emulator.wait_for(lambda: queue.visible_messages(), 30, "/queue")
        text = queue.visible_messages()[-1].content
        assert "GPU workers:** 2" in text and "gpu-a (0/1 busy)" in text and "gpu-b (0/1 busy)" in text


async def until(condition, timeout: float, what: str) -> None:
    """Poll a condition that no emulator event announces."""

    async def reached() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(reached(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def running_on(workers: Workers, job_id: str) -> str | None:
    return next((name for name in workers.processes if job_id in workers.ran(name)), None)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
async def test_a_stopped_worker_s_job_runs_again_on_a_live_worker_and_is_delivered_once(tmp_path, prefix, signum):
    """SIGKILL: the bot notices within 3 heartbeats. SIGTERM: the worker hands its job back at once."""
    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        await asyncio.gather(workers.start("gpu-a"), workers.start("gpu-b"))
        alice, bob = emulator.user("alice"), emulator.user("bob")
        doomed = await compose(emulator, alice, seed=1, duration=120)
        other = await compose(emulator, bob, seed=2, duration=120)  # outlives many heartbeats: must run once
        await until(lambda: running_on(workers, doomed) and running_on(workers, other), 120, "both running")
        victim = running_on(workers, doomed)
        await asyncio.sleep(1.0)  # well into the track
        killed_at = asyncio.get_running_loop().time()
        await workers.kill(victim, signum)
        survivor = next(name for name in workers.processes if name != victim)
        await until(lambda: bot.queue.get(doomed).attempt == 2, 60, "the job handed out again")
        # 3 heartbeats (1.5 s) and one check: bounded by the heartbeat, never by how long the track takes
        assert asyncio.get_running_loop().time() - killed_at < 10
        await every_job_settled(bot.store)
        delivered_once(emulator, [alice, bob], [doomed, other])
        assert workers.ran(survivor)[-1] == doomed  # after its own job: the survivor's one slot was busy
        assert workers.ran(survivor).count(other) + workers.ran(victim).count(other) == 1, (
            "a live worker's job ran once"
        )
        assert (await bot.store.get(doomed)).attempt == 2 and (await bot.store.get(other)).attempt == 1


async def test_cancel_reaches_a_job_running_on_a_worker(tmp_path, prefix):
    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        # A slow heartbeat: the cancel must come through Redis pub/sub, not the heartbeat's check
        await workers.start("gpu-a", MTM_HEARTBEAT_SECONDS="30")
        alice = emulator.user("alice")
        job_id = await compose(emulator, alice, seed=3, duration=180)
        await until(lambda: running_on(workers, job_id), 120, "running")
        await until(lambda: (bot.delivery.stage_of(job_id) or "").startswith("generating"), 120, "generating")
        queue = await emulator.slash(alice, "queue")
        await emulator.wait_for(lambda: queue.visible_messages(), 30, "/queue")
        assert f"`{job_id}` compose by {alice.mention}" in queue.visible_messages()[-1].content
        assert (
            "on gpu-a" in queue.visible_messages()[-1].content
            and "gpu-a (1/1 busy)" in queue.visible_messages()[-1].content
        )
        cancel = await emulator.slash(alice, "cancel", {"job": job_id})
        await emulator.wait_for(lambda: cancel.visible_messages(), 30, "/cancel")
        assert "stopping" in cancel.visible_messages()[-1].content
        await every_job_settled(bot.store, timeout=10)  # not the whole 3-minute track, nor a heartbeat
        job = await bot.store.get(job_id)
        assert job.state is JobState.CANCELLED and job.delivered
        assert "Finished job " + job_id in workers.log("gpu-a").read_text()
        # the worker is free again: the next job runs
        second = await compose(emulator, alice, seed=4)
        await every_job_settled(bot.store)
        delivered_once(emulator, [alice], [second])


async def test_a_worker_that_cannot_load_its_models_takes_no_job(tmp_path, prefix):
    workers = Workers(tmp_path, REDIS_URL, prefix)
    process = await workers.start(
        "broken", wait=False, MTM_PROFILE="full", HF_HOME=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1"
    )
    assert await asyncio.wait_for(process.wait(), 120) == 1
    log = workers.log("broken").read_text()
    assert "cannot load its models, so it takes no job" in log and "Traceback" not in log
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not list(client.scan_iter(match=f"{prefix}:*")), "it never announced itself nor read a job"
    finally:
        client.close()


async def test_worker_without_a_broker_url_exits_2_saying_what_to_set():
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mtm_bot", "worker"],
        cwd=ROOT,
        env=bot_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "MTM_BROKER_URL is not set" in done.stderr and "redis://" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


async def test_a_worker_of_another_protocol_version_refuses_the_order_and_hands_it_back(tmp_path, prefix):
    from taskiq.kicker import AsyncKicker

    from mtm_bot.transport.protocol import TASK_NAME, JobStream

    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        await workers.start("gpu-a")
        broker = JobStream(Settings(broker_url=REDIS_URL, broker_prefix=prefix), consumer_name="test")
        await AsyncKicker(task_name=TASK_NAME, broker=broker, labels={}).kiq(
            {"v": 999, "attempt": 1, "job": {"id": "0123abcd", "kind": "compose", "fields": "of a future release"}}
        )
        await broker.shutdown()
        # and a worker of another version (its heartbeat says so) is given no job
        client = redis.Redis.from_url(REDIS_URL)
        client.set(
            f"{prefix}:worker:future/1",
            '{"v": 2, "id": "future/1", "name": "future", "capacity": 5, "running": []}',
            px=60_000,
        )
        client.close()
        await until(lambda: len(bot.scheduler.runner.workers()) == 2, 30, "the other worker's heartbeat")
        assert bot.scheduler.runner.capacity == 1 and bot.queue.capacity == 1
        await until(lambda: "Refusing job 0123abcd" in workers.log("gpu-a").read_text(), 60, "refusal")
        assert "protocol version 999, this worker version 1" in workers.log("gpu-a").read_text()
        alice = emulator.user("alice")
        job_id = await compose(emulator, alice, seed=5)  # it goes on serving
        await every_job_settled(bot.store)
        delivered_once(emulator, [alice], [job_id])


async def start_bot_process(
    emulator: DiscordEmulator, storage: Path, log: Path, broker_url: str, prefix: str, connected: bool = True
) -> asyncio.subprocess.Process:
    """`python bot.py` in distributed mode (a process of its own, so that a test can kill it)."""
    return await start_bot(
        emulator,
        storage,
        log,
        connected,
        MTM_BROKER_URL=broker_url,
        MTM_BROKER_PREFIX=prefix,
        MTM_HEARTBEAT_SECONDS=HEARTBEAT,
    )


async def settled_and_stored(storage: Path, job_ids: list[str]) -> None:
    store = await JobStore.open(Settings(storage_dir=storage))
    try:
        await every_job_settled(store)
        for job_id in job_ids:
            assert (await store.get(job_id)).state is JobState.DONE
    finally:
        await store.close()


async def test_results_made_while_the_bot_was_killed_are_delivered_once_after_its_restart(tmp_path, prefix):
    emulator = await DiscordEmulator().start()
    storage, log = tmp_path / "storage", tmp_path / "bot.log"
    workers = Workers(tmp_path, REDIS_URL, prefix)
    processes = []
    try:
        await workers.start("gpu-a")
        processes.append(await start_bot_process(emulator, storage, log, REDIS_URL, prefix))
        await emulator.wait_for(lambda: emulator.commands, 60, "command sync")
        alice = emulator.user("alice")
        job_id = await compose(emulator, alice, seed=6, duration=60)
        await until(lambda: running_on(workers, job_id), 120, "running on the worker")
        processes[0].send_signal(signal.SIGKILL)
        assert await processes[0].wait() == -signal.SIGKILL
        await until(
            lambda: f"Finished job {job_id}" in workers.log("gpu-a").read_text(),
            JOB_SECONDS,
            "the worker to finish while the bot is down",
        )
        assert not results_for(emulator, alice)
        processes.append(await start_bot_process(emulator, storage, log, REDIS_URL, prefix))
        await emulator.wait_for(lambda: results_for(emulator, alice), JOB_SECONDS, "the result after the restart")
        later = await compose(emulator, alice, seed=7)  # anything delivered twice would be on record by then
        await settled_and_stored(storage, [job_id, later])
        delivered_once(emulator, [alice], [job_id, later])
        assert workers.ran("gpu-a").count(job_id) == 1, "taken up, not run again"
        processes[1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(processes[1].wait(), 60) == 0
        assert "Traceback" not in log.read_text() and TOKEN not in log.read_text()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await workers.stop_all()
        await emulator.stop()


class PrivateRedis:
    """A redis-server of this test's own on a free port, keeping nothing on disk (like the machines' own)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.dir = free_port(), tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed (.ci/run installs it)"
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            import time

            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def test_redis_restarted_empty_loses_no_job_and_everyone_reconnects(tmp_path, prefix):
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        async with distributed(tmp_path, prefix, broker_url=private.url) as (emulator, bot, workers):
            await workers.start("gpu-a")
            alice, bob = emulator.user("alice"), emulator.user("bob")
            running = await compose(emulator, alice, seed=8, duration=60)
            await until(lambda: running_on(workers, running), 120, "running")
            private.kill()
            queued = await compose(emulator, bob, seed=9)  # accepted while Redis is down: SQLite holds it
            private.start()  # empty
            await every_job_settled(bot.store)
            delivered_once(emulator, [alice, bob], [running, queued])
            later = await compose(emulator, alice, seed=10)  # the worker reconnected on its own
            await every_job_settled(bot.store)
            delivered_once(emulator, [alice], [later])
            assert "Traceback" not in workers.log("gpu-a").read_text()
    finally:
        private.kill()


async def test_unreachable_redis_at_start_is_one_sentence_and_retries_until_it_answers(tmp_path, prefix):
    private = PrivateRedis(tmp_path)  # not started yet
    emulator = await DiscordEmulator().start()
    storage, log = tmp_path / "storage", tmp_path / "bot.log"
    workers = Workers(tmp_path, private.url, prefix)
    bot = None
    try:
        bot = await start_bot_process(emulator, storage, log, private.url, prefix, connected=False)
        await workers.start("gpu-a", wait=False)
        await until(
            lambda: (
                "cannot reach Redis" in log.read_text() and "cannot reach Redis" in workers.log("gpu-a").read_text()
            ),
            300,
            "the complaints",
        )
        private.start()
        await emulator.wait_for(lambda: emulator.identifies, 300, "the bot to connect once Redis answers")
        await workers.ready("gpu-a", timeout=120)
        for text in (log.read_text(), workers.log("gpu-a").read_text()):
            assert "Traceback" not in text
            assert f"cannot reach Redis at {private.url}" in text
        await emulator.wait_for(lambda: emulator.commands, 60, "command sync")
        alice = emulator.user("alice")
        job_id = await compose(emulator, alice, seed=11)
        await settled_and_stored(storage, [job_id])
        delivered_once(emulator, [alice], [job_id])
    finally:
        if bot is not None and bot.returncode is None:
            bot.kill()
            await bot.wait()
        await workers.stop_all()
        await emulator.stop()
        private.kill()


async def test_the_embedded_default_imports_no_redis_and_no_taskiq():
    code = (
        "import sys, bot, cogs.queue, mtm_bot.jobs.scheduler, mtm_bot.jobs.runner; "
        "print(sorted(m for m in ('redis', 'taskiq', 'taskiq_redis') if m in sys.modules))"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=bot_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


async def test_a_job_that_lost_its_worker_four_times_fails_with_a_sentence(tmp_path, prefix):
    from mtm_bot.jobs.job import Job, JobKind

    emulator = await DiscordEmulator().start()
    settings = Settings(storage_dir=tmp_path / "storage")
    store = await JobStore.open(settings)  # a job the bot had handed out 4 times before it restarted
    job = Job.new(
        JobKind.COMPOSE,
        user_id=emulator.user("alice").id,
        guild_id=emulator.guild_id,
        channel_id=emulator.channel_id,
        instruction="unlucky",
        duration=10,
        attachment_size_limit=10 << 20,
        application_id=1,
        interaction_token="gone",
    )
    job.input_path = await store.save_input(job.id, wav_bytes(2.0), "a.wav")
    job.state, job.started_at, job.attempt, job.seed = JobState.RUNNING, 1.0, 4, 1
    await store.add(job)
    await store.close()
    bot, runner = await connect_bot(
        emulator,
        tmp_path / "storage",
        MTM_BROKER_URL=REDIS_URL,
        MTM_BROKER_PREFIX=prefix,
        MTM_HEARTBEAT_SECONDS=HEARTBEAT,
    )
    try:
        await every_job_settled(bot.store, timeout=60)  # no worker holds it: after the grace it is not tried again
        failed = await bot.store.get(job.id)
        assert failed.state is JobState.FAILED and "stopped 4 times" in failed.error
        assert any("stopped 4 times" in m.content for m in emulator.messages)
    finally:
        await disconnect_bot(bot, runner)
        await emulator.stop()


async def test_jobs_built_on_a_result_get_its_kept_files_through_redis(tmp_path, prefix):
    """Reroll and MIDI on a worker: the parent's track, state and clip travel as blobs, no shared disk."""
    import io

    import mido
    import numpy as np
    import soundfile as sf
    from synth import music
    from test_bot_results import caption_lines, result_of

    from mtm_bot.core.audio import Audio, write

    async with distributed(tmp_path, prefix) as (emulator, bot, workers):  # MTM_SEED fixed: a reroll still differs
        await workers.start("gpu-a")
        alice, bob, carol = emulator.user("alice"), emulator.user("bob"), emulator.user("carol")
        original = await result_of(
            emulator,
            await emulator.slash(
                alice,
                "compose",
                {"instruction": "a cosy jazz carol", "duration": 20},
                attachment=(wav_bytes(14.0), "hum.wav", "audio/wav"),
            ),
            alice,
        )
        reroll = await result_of(emulator, await emulator.click(bob, original, "Reroll"), bob)
        assert caption_lines(reroll) == caption_lines(original) and len(caption_lines(reroll)) == 2

        def samples(message):
            return sf.read(io.BytesIO(message.files[0].data), dtype="float32")[0]

        assert len(samples(reroll)) == len(samples(original)) and not np.array_equal(samples(reroll), samples(original))
        # real notes in the kept track (the tiny models make noise), so that the worker has something to transcribe
        parent_id = original.content.split("(job `")[1][:8]
        write(Audio(music(20.0, 32000, seed=3), 32000), bot.store.output_path(parent_id))
        clicked = await emulator.click(carol, original, "MIDI")
        sent = await emulator.wait_for(
            lambda: next((m for m in clicked.visible_messages() if m.files), None), JOB_SECONDS, "the MIDI file"
        )
        notes = [m for m in mido.MidiFile(file=io.BytesIO(sent.files[0].data)) if m.type == "note_on" and m.velocity]
        assert sent.ephemeral and notes
        assert len(workers.ran("gpu-a")) == 3


async def test_a_worker_takes_as_many_jobs_as_its_batch_size(tmp_path, prefix):
    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        await workers.start("gpu-a", MTM_MAX_BATCH="2")
        await until(lambda: bot.scheduler.runner.capacity == 2, 30, "two slots")
        users = [emulator.user(name) for name in ("alice", "bob", "carol")]
        jobs = [await compose(emulator, user, seed=20 + i, duration=60) for i, user in enumerate(users)]
        await until(lambda: len(workers.ran("gpu-a")) >= 2, 120, "two jobs running")
        log = workers.log("gpu-a").read_text()
        assert "Finished job" not in log.split(f"Running job {workers.ran('gpu-a')[1]}")[0], "both at once"
        assert bot.queue.position(jobs[2]) == 1  # the third waits for a free slot: not handed out yet
        await every_job_settled(bot.store)
        delivered_once(emulator, users, jobs)


async def test_the_broker_password_never_reaches_a_log_and_a_wrong_url_is_refused():
    from mtm_bot.core.settings import SettingsError
    from mtm_bot.transport.protocol import safe_url

    url = "rediss://:s3cret-pass@redis.example.org:6380/2"
    assert safe_url(url) == "rediss://:***@redis.example.org:6380/2"
    assert safe_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    settings = Settings.from_env({"MTM_BROKER_URL": url}, env_file=None)
    assert "s3cret" not in repr(settings)
    with pytest.raises(SettingsError, match="MTM_BROKER_URL must be a Redis URL"):
        Settings.from_env({"MTM_BROKER_URL": "amqp://guest@localhost"}, env_file=None)


async def test_a_job_handed_out_but_lost_with_an_emptied_redis_is_handed_out_again_from_sqlite(tmp_path, prefix):
    """The worker freezes (SIGSTOP) mid-job, so the bot declares it dead and hands the job out again; that order
    waits in Redis for a free worker, and Redis restarts empty, losing it. The worker comes back and
    finishes its stale attempt: the bot takes nothing of it, hands the job out from SQLite once more, and
    delivers that one result."""
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        async with distributed(tmp_path, prefix, broker_url=private.url) as (emulator, bot, workers):
            await workers.start("gpu-a")
            alice = emulator.user("alice")
            job_id = await compose(emulator, alice, seed=12, duration=30)
            await until(lambda: running_on(workers, job_id), 120, "running")
            workers.processes["gpu-a"].send_signal(signal.SIGSTOP)
            await until(lambda: bot.queue.get(job_id).attempt == 2, 30, "handed out again after 3 heartbeats")
            private.kill()
            private.start()  # empty: the waiting order is gone
            workers.processes["gpu-a"].send_signal(signal.SIGCONT)
            await every_job_settled(bot.store)
            delivered_once(emulator, [alice], [job_id])
            job = await bot.store.get(job_id)
            assert job.state is JobState.DONE and job.attempt == 3
            assert f"Running job {job_id} (attempt 3)" in workers.log("gpu-a").read_text()
    finally:
        private.kill()


async def test_every_take_comes_back_from_a_gpu_worker_and_is_delivered_once(tmp_path, prefix):
    """takes:2 on a worker: the second take's track and state travel back through Redis with the first."""
    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        await workers.start("gpu-a")
        alice = emulator.user("alice")
        interaction = await emulator.slash(
            alice,
            "compose",
            {"instruction": "a carol", "duration": 10, "takes": 2},
            attachment=(wav_bytes(2.0), "c.wav", "audio/wav"),
        )
        job_id = await accepted(emulator, interaction)
        await every_job_settled(bot.store)
        takes = [m for m in results_for(emulator, alice) if " of 2 is ready" in m.content]
        assert len(takes) == 2 and all(m.files for m in takes)
        take_2 = (await bot.store.get(job_id)).result_json["takes"][0]
        stored = await bot.store.get(take_2)
        assert stored.delivered and bot.store.kept_files(stored).exist()
        assert workers.ran("gpu-a") == [job_id]


class HungGpu:
    """A job runner whose job hangs in a GPU call that never returns and ignores its cancel token, as a
    wedged driver does; released only at the end of the test."""

    def __init__(self, files) -> None:
        import threading

        self.files = files
        self.hung = threading.Event()
        self.release = threading.Event()

    def execute(self, job, report, token, captions):
        from mtm_bot.core.progress import Progress

        self.last_progress = time.monotonic()  # the stall is counted from here
        report(Progress("captioning"))
        self.hung.set()
        self.release.wait(120)
        raise RuntimeError("released at the end of the test")


async def test_a_worker_whose_job_hangs_leaves_and_the_job_runs_on_another_worker(tmp_path, prefix, caplog):
    """No progress for MTM_STALL_SECONDS: the stuck worker stops beating and leaves at once (its job thread
    may never return), the bot hands the job to a live worker, and the user gets one track."""
    from mtm_bot.jobs.store import JobFiles
    from mtm_bot.transport.gpu_worker import GpuWorker

    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        settings = Settings.from_env(
            dict(
                MTM_BROKER_URL=REDIS_URL,
                MTM_BROKER_PREFIX=prefix,
                MTM_HEARTBEAT_SECONDS=HEARTBEAT,
                MTM_STALL_SECONDS="3",
                MTM_MAX_BATCH="1",
                MTM_WORKER_NAME="wedged",
            ),
            env_file=None,
        )
        files = JobFiles(tmp_path / "wedged")
        files.make_folders()
        gpu = HungGpu(files)
        serving = asyncio.create_task(GpuWorker(settings, gpu).serve(asyncio.Event()))  # type: ignore[arg-type]
        try:
            await until(lambda: bot.scheduler.runner.capacity == 1, 30, "the worker seen")
            alice = emulator.user("alice")
            job_id = await compose(emulator, alice, seed=7)
            await until(gpu.hung.is_set, 120, "the job hanging")
            hung_at = gpu.last_progress
            assert await asyncio.wait_for(serving, 30) is False, "the worker left"
            assert time.monotonic() - hung_at >= 3, "not before MTM_STALL_SECONDS"
            assert "made no progress for 3 s: this worker is stuck" in caplog.text
            await until(lambda: bot.queue.get(job_id).attempt == 2, 30, "the job handed out again")
            await workers.start("gpu-b")
            await every_job_settled(bot.store)
            delivered_once(emulator, [alice], [job_id])
            assert workers.ran("gpu-b") == [job_id] and (await bot.store.get(job_id)).state is JobState.DONE
        finally:
            gpu.release.set()
            if not serving.done():
                serving.cancel()


async def test_a_redis_out_of_memory_for_a_while_delays_jobs_and_loses_none(tmp_path, prefix, caplog):
    """maxmemory reached mid-job (clips and tracks travel through Redis, so a busy server can fill it): every
    write is refused with OOM. The worker and the bot retry with a line per try instead of a task dying in
    silence; once Redis has room again the job and one submitted after it are each delivered once."""
    private = PrivateRedis(tmp_path)
    private.start()
    client = redis.Redis(port=private.port)
    try:
        async with distributed(tmp_path, prefix, broker_url=private.url) as (emulator, bot, workers):
            await workers.start("gpu-a")
            alice = emulator.user("alice")
            job_id = await compose(emulator, alice, seed=12, duration=30)
            await until(lambda: running_on(workers, job_id), 120, "running")
            client.config_set("maxmemory", "1")  # far below what it holds: every write refused
            await until(lambda: "maxmemory" in workers.log("gpu-a").read_text(), 30, "the worker refused")
            await asyncio.sleep(3 * float(HEARTBEAT) + 1)  # long enough for the bot to take the worker for dead
            client.config_set("maxmemory", "0")
            second = await compose(emulator, alice, seed=13)
            await every_job_settled(bot.store, timeout=120)
            delivered_once(emulator, [alice], [job_id, second])
            log = workers.log("gpu-a").read_text()
            assert "Redis is unavailable" in log and "Traceback" not in log
            assert "scheduler failed" not in caplog.text
            assert workers.processes["gpu-a"].returncode is None, "the worker is still serving"
    finally:
        client.close()
        private.kill()
