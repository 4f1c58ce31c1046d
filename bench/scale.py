"""Benchmark: distributed mode's throughput with one and with two GPU workers, and its dispatch overhead.

    MTM_BROKER_URL=redis://127.0.0.1:6379/0 python -m bench.scale [--jobs 8] [--seconds 30] [--device cpu]

The bot's scheduler (mtm_bot.jobs.scheduler with mtm_bot.transport.distributed.RemoteRunner: store, fair queue, hand-out
only to a free slot) runs in this process without Discord; the workers are real `python -m mtm_bot worker`
processes (tiny profile, one thread and one slot each) on their own key prefix in that Redis. Each round
submits the same jobs at once and waits for every outcome. The embedded default (the same jobs in this
process, one at a time) is timed beside them as the reference.

Dispatch overhead: per worker, the time from its "finished" event (it is free) to its next "started"
event (it has the next job), both stamped by the worker's clock, over the rounds' events; it spans the
bot reading the event, storing the outcome, picking the next job and handing it out, and the worker
reading it. Prints one JSON object; `speedup` is two workers' jobs per minute over one worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]


class Outcomes:
    """JobListener that only notes when each job's outcome arrived."""

    def __init__(self) -> None:
        self.done: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def job_started(self, job) -> None: ...

    async def job_progress(self, job, progress) -> None: ...

    async def job_captions(self, job, lines) -> None: ...

    async def _record(self, job) -> None:
        self.done[job.id] = job.state.value
        self.changed.set()

    job_finished = job_cancelled = _record

    async def job_failed(self, job, message) -> None:
        await self._record(job)


async def run_round(settings, clip: Path, jobs: int, seconds: int, runner_factory) -> dict:
    """Submit `jobs` compose jobs at once to a fresh scheduler; seconds until all are delivered."""
    from mtm_bot.jobs.job import Job, JobKind
    from mtm_bot.jobs.queue import JobQueue
    from mtm_bot.jobs.scheduler import Scheduler
    from mtm_bot.jobs.store import JobStore

    store = await JobStore.open(settings)
    queue, outcomes = JobQueue(settings), Outcomes()
    scheduler = Scheduler(settings, runner_factory(store), store, queue, outcomes)
    await scheduler.start()
    try:
        data = clip.read_bytes()
        began = time.perf_counter()
        for i in range(jobs):
            job = Job.new(
                JobKind.COMPOSE,
                user_id=i % 4,
                guild_id=1,
                channel_id=1,
                instruction=f"carol {i}",
                duration=seconds,
                attachment_size_limit=25 << 20,
                application_id=1,
                interaction_token="",
            )
            job.input_path = await store.save_input(job.id, data, "clip.wav")
            await scheduler.submit(job)
        while len(outcomes.done) < jobs:
            outcomes.changed.clear()
            await outcomes.changed.wait()
        wall = time.perf_counter() - began
    finally:
        await scheduler.stop()
        await store.close()
    states = sorted(set(outcomes.done.values()))
    assert states == ["done"], f"not every job succeeded: {outcomes.done}"
    return {"seconds": round(wall, 3), "jobs_per_minute": round(60 * jobs / wall, 2)}


def start_workers(count: int, url: str, prefix: str, device: str, folder: Path) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "MTM_PROFILE": "tiny",
        "MTM_DEVICE": device,
        "MTM_BROKER_URL": url,
        "MTM_BROKER_PREFIX": prefix,
        "MTM_MAX_BATCH": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    processes = []
    for n in range(count):
        log = open(folder / f"worker-{prefix}-{n}.log", "wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "mtm_bot", "worker"],
                cwd=ROOT,
                env={**env, "MTM_WORKER_NAME": f"bench-{n}"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return processes


async def wait_for_workers(url: str, prefix: str, count: int, processes, timeout: float = 600) -> None:
    client = aioredis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while len([k async for k in client.scan_iter(match=f"{prefix}:worker:*")]) < count:
            if any(p.poll() is not None for p in processes):
                raise SystemExit("a worker exited while starting; see its log")
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not come up")
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def stop(processes) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


async def dispatch_gaps(url: str, prefix: str) -> list[float]:
    """Seconds from each worker's "finished" to its next "started" (events stamped by the worker)."""
    client = aioredis.Redis.from_url(url)
    try:
        entries = await client.xrange(f"{prefix}:events")
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    last_free: dict[str, float] = {}
    gaps = []
    for _, fields in entries:
        event = json.loads(fields[b"data"])
        if event["type"] in ("done", "failed", "cancelled"):
            last_free[event["worker"]] = event["at"]
        elif event["type"] == "started" and event["worker"] in last_free:
            gaps.append(event["at"] - last_free.pop(event["worker"]))
    return gaps


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=30, help="music per job (30 s: a track made from words alone)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    url = os.environ.get("MTM_BROKER_URL", "redis://127.0.0.1:6379/0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
    from mtm_bot.core.settings import Settings
    from mtm_bot.jobs.runner import JobRunner
    from mtm_bot.stages.pipeline import Pipeline
    from mtm_bot.transport.distributed import RemoteRunner
    from mtm_bot.transport.local import LocalRunner
    from tests.synth import write_music

    report: dict = {
        "jobs": args.jobs,
        "seconds_of_music_per_job": args.seconds,
        "device": args.device,
        "redis": url.split("@")[-1],
    }
    gaps: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        clip = folder / "clip.wav"
        write_music(clip, 5.0)
        base = Settings(
            profile="tiny",
            device=args.device,
            max_batch=1,
            max_jobs_per_user=args.jobs,
            seed=1,
            max_queue_length=max(50, args.jobs),
        )

        # Reference: the embedded default, the same jobs in this process, one at a time.
        pipeline = Pipeline(base).load()
        embedded = Settings(**{**base.__dict__, "storage_dir": folder / "embedded"})
        report["embedded"] = await run_round(
            embedded, clip, args.jobs, args.seconds, lambda store: LocalRunner(JobRunner(pipeline, store), 1)
        )

        for workers in (1, 2):
            prefix = f"mtm-bench-{secrets.token_hex(4)}"
            settings = Settings(
                **{
                    **base.__dict__,
                    "storage_dir": folder / f"w{workers}",
                    "broker_url": url,
                    "broker_prefix": prefix,
                    "heartbeat_seconds": 1.0,
                }
            )
            processes = start_workers(workers, url, prefix, args.device, folder)
            try:
                await wait_for_workers(url, prefix, workers, processes)
                report[f"workers_{workers}"] = await run_round(
                    settings, clip, args.jobs, args.seconds, lambda store: RemoteRunner(settings, store)
                )
            finally:
                stop(processes)
            gaps += await dispatch_gaps(url, prefix)

    report["speedup"] = round(report["workers_2"]["jobs_per_minute"] / report["workers_1"]["jobs_per_minute"], 3)
    report["dispatch_overhead_ms"] = (
        {"median": round(1000 * statistics.median(gaps), 2), "max": round(1000 * max(gaps), 2), "samples": len(gaps)}
        if gaps
        else None
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
