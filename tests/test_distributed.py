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
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from discord_emulator import DiscordEmulator, FakeUser
from mtm_bot.jobs import JobState, JobStore
from mtm_bot.settings import Settings
from test_bot_e2e import JOB_SECONDS, LINE, accepted, connect_bot, disconnect_bot, every_job_settled, results_for, \
    wav_bytes

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("MTM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HEARTBEAT = "0.5"  # seconds: a killed worker is noticed within 1.5 s

pytestmark = pytest.mark.asyncio(loop_scope="function")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MTM_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def prefix():
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards."""
    name = f"mtm-test-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
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
        settings = dict(MTM_PROFILE="tiny", MTM_DEVICE="cpu", MTM_BROKER_URL=self.broker_url,
                        MTM_BROKER_PREFIX=self.prefix, MTM_MAX_BATCH="1", MTM_HEARTBEAT_SECONDS=HEARTBEAT,
                        MTM_WORKER_NAME=name, OMP_NUM_THREADS="1", **env)
        with open(self.log(name), "ab") as out:
            process = await asyncio.create_subprocess_exec(sys.executable, "-m", "mtm_bot", "worker", cwd=ROOT,
                                                           env=clean_env(**settings), stdout=out,
                                                           stderr=subprocess.STDOUT)
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

    def ran(self, name: str) -> list[str]:
        """Job ids the worker started, in order."""
        return [line.split("Running job ")[1].split()[0] for line in self.log(name).read_text().splitlines()
                if "Running job " in line]

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
async def distributed(tmp_path: Path, prefix: str, broker_url: str = REDIS_URL,
                      **env: str) -> AsyncIterator[tuple[DiscordEmulator, object, Workers]]:
    """The emulator, the bot (in this process, distributed mode) and an empty set of workers."""
    emulator = await DiscordEmulator().start()
    workers = Workers(tmp_path, broker_url, prefix)
    bot, runner = await connect_bot(emulator, tmp_path / "storage", MTM_BROKER_URL=broker_url,
                                    MTM_BROKER_PREFIX=prefix, MTM_HEARTBEAT_SECONDS=HEARTBEAT, **env)
    try:
        yield emulator, bot, workers
    finally:
        await workers.stop_all()
        await disconnect_bot(bot, runner)
        await emulator.stop()


async def compose(emulator: DiscordEmulator, user: FakeUser, seed: int, duration: int = 10) -> str:
    interaction = await emulator.slash(user, "compose", {"instruction": f"carol {seed}", "duration": duration},
                                       attachment=(wav_bytes(2.0, seed=seed), f"c{seed}.wav", "audio/wav"))
    return await accepted(emulator, interaction)


def delivered_once(emulator: DiscordEmulator, users: list[FakeUser], job_ids: list[str]) -> None:
    results = [m for user in users for m in results_for(emulator, user)]
    for job_id in job_ids:
        mine = [m for m in results if f"`{job_id}`" in m.content]
        assert len(mine) == 1, (job_id, [m.content for m in mine])
        assert LINE.search(mine[0].text()) and len(mine[0].files) == 1


async def test_two_workers_serve_six_jobs_of_three_users_round_robin_each_delivered_once(tmp_path, prefix):
    async with distributed(tmp_path, prefix) as (emulator, bot, workers):
        assert bot.pipeline._generator is None and bot.pipeline._captioner is None  # the bot loads no model
        users = [emulator.user(name) for name in ("alice", "bob", "carol")]
        # Every job is queued before a worker exists: the order they start in is the bot's alone.
        jobs = [await compose(emulator, user, seed=10 * i + n) for i, user in enumerate(users) for n in range(2)]
        queue = await emulator.slash(users[0], "queue")
        await emulator.wait_for(lambda: queue.visible_messages(), 30, "/queue")
        assert "none connected" in queue.visible_messages()[-1].content
        await asyncio.gather(workers.start("gpu-a"), workers.start("gpu-b"))
        await every_job_settled(bot.store)
        delivered_once(emulator, users, jobs)
        started = sorted([await bot.store.get(j) for j in jobs], key=lambda job: job.started_at)
        owners = {job.id: job.user_id for job in started}
        assert [owners[j.id] for j in started] == [u.id for u in users] * 2, "round-robin across users"
        assert workers.ran("gpu-a") and workers.ran("gpu-b"), "both workers did work"
        assert sorted(workers.ran("gpu-a") + workers.ran("gpu-b")) == sorted(jobs), "each job ran once"
        queue = await emulator.slash(users[0], "queue")
        await emulator.wait_for(lambda: queue.visible_messages(), 30, "/queue")
        text = queue.visible_messages()[-1].content
        assert "GPU workers:** 2" in text and "gpu-a (0/1 busy)" in text and "gpu-b (0/1 busy)" in text
