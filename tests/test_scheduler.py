"""The scheduler: order, limits, cancel, crash recovery, failures that stay one job's problem, a free event loop."""

import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mtm_bot.core.audio import Audio, load_clip, write
from mtm_bot.core.progress import Progress
from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import Job, JobKind, JobState
from mtm_bot.jobs.queue import JobQueue, TooManyJobs
from mtm_bot.jobs.runner import OOM_MESSAGE, UNEXPECTED_MESSAGE, JobRunner
from mtm_bot.jobs.scheduler import JobNotFound, NotCancellable, Scheduler
from mtm_bot.jobs.store import JobStore
from mtm_bot.stages.pipeline import Pipeline
from mtm_bot.transport.local import LocalRunner
from tests.synth import write_music

RATE = 32000


@dataclass
class FakeResult:
    audio: Audio
    seed: int

    def caption_lines(self) -> list[str]:
        return ["0:00\u20130:10 a cosy jazz carol"]

    def to_json(self) -> dict:
        return {"seed": self.seed, "duration": self.audio.duration}

    def kept(self, instruction: str, clip: Audio | None) -> "FakeKept":
        return FakeKept(self.audio)


@dataclass
class FakeKept:
    """Keeps only the track: enough for delivery."""

    audio: Audio

    def save(self, files) -> None:
        write(self.audio, files.track)


class FakePipeline:
    """Test double of Pipeline: a few "decode steps", each checking the cancel token and reporting progress.

    `step` runs inside each step (in the worker thread): block on an event, burn CPU, or raise.
    """

    def __init__(self, steps: int = 3, step=None) -> None:
        self.steps = steps
        self.step = step or (lambda job_instruction, i: None)
        self.ran: list[tuple[str, int | None]] = []  # (instruction, seed) per compose call
        self.threads: set[str] = set()

    def read_clip(self, path) -> Audio:
        return load_clip(path)

    def compose(
        self,
        clip,
        instruction,
        duration=None,
        seed=None,
        progress=None,
        cancel=None,
        on_captions=None,
        image=None,
        takes=1,
    ):
        self.threads.add(threading.current_thread().name)
        self.ran.append((instruction, seed))
        on_captions(["0:00\u20130:10 a cosy jazz carol"])
        for i in range(self.steps):
            cancel.check()
            progress(Progress("generating", 1, 1, i + 1, self.steps))
            self.step(instruction, i)
        samples = np.random.default_rng(seed).uniform(-0.5, 0.5, (duration or 10) * RATE)
        return FakeResult(Audio(samples, RATE), seed)


class Recorder:
    """The bot's side of JobListener, recording every call; deliveries can be made to fail."""

    def __init__(self, failing_deliveries: int = 0) -> None:
        self.events: list[tuple] = []
        self.failing_deliveries = failing_deliveries

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]

    async def job_started(self, job):
        self.events.append(("started", job.id))

    async def job_progress(self, job, progress):
        self.events.append(("progress", job.id, progress.step))

    async def job_captions(self, job, lines):
        self.events.append(("captions", job.id, lines))

    async def job_finished(self, job):
        self._maybe_fail()
        self.events.append(("finished", job.id, job.resumed))

    async def job_failed(self, job, message):
        self._maybe_fail()
        self.events.append(("failed", job.id, message))

    async def job_cancelled(self, job):
        self._maybe_fail()
        self.events.append(("cancelled", job.id))

    def _maybe_fail(self):
        if self.failing_deliveries:
            self.failing_deliveries -= 1
            raise ConnectionError("Discord is down")


async def eventually(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Harness:
    def __init__(self, tmp_path, pipeline=None, listener=None, **settings):
        # One job at a time unless a test asks for more (max_batch): the order tests read simply.
        self.settings = Settings(storage_dir=tmp_path, **{"max_jobs_per_user": 5, "max_batch": 1, **settings})
        self.pipeline = pipeline or FakePipeline()
        self.listener = listener or Recorder()
        self.clip = tmp_path / "clip.wav"
        if not self.clip.exists():
            write_music(self.clip, 2.0)

    async def __aenter__(self):
        self.store = await JobStore.open(self.settings)
        self.queue = JobQueue(self.settings)
        runner = LocalRunner(JobRunner(self.pipeline, self.store), self.settings.max_batch)
        self.scheduler = Scheduler(self.settings, runner, self.store, self.queue, self.listener)
        self.scheduler.DELIVERY_RETRY_SECONDS = 0.01
        return self

    async def __aexit__(self, *exc):
        await self.scheduler.stop()
        await self.store.close()

    async def job(self, user_id: int, instruction: str = "jazz", kind=JobKind.COMPOSE, guild_id=1) -> Job:
        job = Job.new(
            kind,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=2,
            instruction=instruction,
            duration=10,
            attachment_size_limit=10 << 20,
            application_id=3,
            interaction_token="tok",
        )
        job.input_path = await self.store.save_input(job.id, self.clip.read_bytes(), "my song.wav")
        return job

    async def submit(self, user_id: int, instruction: str = "jazz", **kw) -> Job:
        job = await self.job(user_id, instruction, **kw)
        await self.scheduler.submit(job)
        return job

    def outcomes(self) -> list[tuple]:
        return [e for e in self.listener.events if e[0] in ("finished", "failed", "cancelled")]


async def test_compose_job_runs_in_a_worker_thread_and_delivers_a_wav(tmp_path):
    async with Harness(tmp_path) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        await eventually(lambda: h.outcomes())
        await eventually(lambda: job.delivered)

        assert h.listener.events[0] == ("started", job.id)
        assert [e[2] for e in h.listener.of("progress")] == [1, 2, 3]
        assert h.listener.of("captions") == [("captions", job.id, ["0:00\u20130:10 a cosy jazz carol"])]
        assert h.outcomes() == [("finished", job.id, False)]
        assert h.pipeline.threads and all(name.startswith("mtm-job") for name in h.pipeline.threads)
        stored = await h.store.get(job.id)
        assert stored.state is JobState.DONE and stored.delivered and stored.seed is not None
        assert stored.result_path == h.store.outputs_dir / f"{job.id}.wav"
        info = sf.info(stored.result_path)
        assert (info.subtype, info.samplerate, info.duration) == ("PCM_16", RATE, 10.0)
        assert stored.result_json["lines"] == ["0:00\u20130:10 a cosy jazz carol"]


async def test_user_after_a_busy_user_runs_second(tmp_path):
    release = threading.Event()  # A's first job runs until everything is submitted

    async with Harness(tmp_path, FakePipeline(step=lambda instruction, i: release.wait(10))) as h:
        await h.scheduler.start()
        for i in range(3):
            await h.submit(1, f"A{i}")
        await h.submit(2, "B0")
        release.set()
        await eventually(lambda: len(h.outcomes()) == 4)
        assert [instruction for instruction, _ in h.pipeline.ran] == ["A0", "B0", "A1", "A2"]


async def test_refused_submission_keeps_nothing(tmp_path):
    async with Harness(tmp_path, max_jobs_per_user=1) as h:  # not started: the first job stays queued
        await h.submit(1)
        refused = await h.job(1)
        with pytest.raises(TooManyJobs, match="limit is 1"):
            await h.scheduler.submit(refused)
        assert await h.store.get(refused.id) is None
        assert not refused.input_path.exists()


async def test_cancel_queued_job_shifts_positions(tmp_path):
    async with Harness(tmp_path) as h:
        await h.submit(1)
        second, third = await h.submit(2), await h.submit(3)
        cancelled = await h.scheduler.cancel(second.id.upper(), user_id=2)
        assert cancelled.state is JobState.CANCELLED
        assert h.queue.position(third.id) == 2
        assert (await h.store.get(second.id)).state is JobState.CANCELLED
        await eventually(lambda: h.outcomes() == [("cancelled", second.id)])
        with pytest.raises(NotCancellable, match="already been cancelled"):
            await h.scheduler.cancel(second.id, user_id=2)


async def test_cancel_running_job_stops_at_next_step_and_the_next_job_runs(tmp_path):
    release = threading.Event()
    step_reached = threading.Event()

    def step(instruction, i):
        if instruction == "slow":
            step_reached.set()
            release.wait(10)

    async with Harness(tmp_path, FakePipeline(steps=50, step=step)) as h:
        await h.scheduler.start()
        slow = await h.submit(1, "slow")
        after = await h.submit(2, "fast")
        await asyncio.to_thread(step_reached.wait, 10)
        assert (await h.scheduler.cancel(None, user_id=1)).state is JobState.RUNNING  # newest unfinished job
        release.set()
        await eventually(lambda: len(h.outcomes()) == 2)
        assert h.outcomes() == [("cancelled", slow.id), ("finished", after.id, False)]
        progress_steps = [e[2] for e in h.listener.of("progress") if e[1] == slow.id]
        assert progress_steps == [1]  # stopped at the step after the cancel, not at the end of 50
        assert (await h.store.get(slow.id)).state is JobState.CANCELLED


async def test_only_requester_or_a_manager_of_that_server_may_cancel(tmp_path):
    async with Harness(tmp_path) as h:
        job = await h.submit(1, guild_id=10)
        with pytest.raises(NotCancellable, match="only its requester or a server manager"):
            await h.scheduler.cancel(job.id, user_id=2)
        with pytest.raises(NotCancellable):
            await h.scheduler.cancel(job.id, user_id=2, guild_id=99, is_manager=True)  # manager elsewhere
        with pytest.raises(JobNotFound, match="no job with id"):
            await h.scheduler.cancel("ffffffff", user_id=1)
        with pytest.raises(JobNotFound, match="no queued or running job"):
            await h.scheduler.cancel(None, user_id=2)
        assert (await h.scheduler.cancel(job.id, user_id=2, guild_id=10, is_manager=True)).state is JobState.CANCELLED


async def test_restart_resumes_running_and_queued_jobs_each_delivered_once(tmp_path):
    async with Harness(tmp_path) as h:  # the state a crash leaves behind
        running, queued = await h.job(1, "was running"), await h.job(2, "was queued")
        running.state, running.started_at, running.seed = JobState.RUNNING, time.time(), 1234
        for job in (running, queued):
            await h.store.add(job)

    async with Harness(tmp_path) as h:
        await h.scheduler.start()
        await eventually(lambda: len(h.outcomes()) == 2)
        await eventually(lambda: not h.scheduler._deliveries)
        assert sorted(h.outcomes()) == sorted([("finished", running.id, True), ("finished", queued.id, True)])
        assert ("was running", 1234) in h.pipeline.ran  # the seed chosen before the crash: same result
        assert all(job.delivered for job in [await h.store.get(running.id), await h.store.get(queued.id)])

    async with Harness(tmp_path) as h:  # a further restart delivers nothing twice
        await h.scheduler.start()
        # A new user's job is queued behind anything the restart could have left to run again; once it
        # is delivered and no delivery is pending, a duplicate would already be in the record.
        marker = await h.submit(3, "marker")
        await eventually(lambda: marker.delivered and not h.scheduler._deliveries)
        assert h.outcomes() == [("finished", marker.id, False)]
        assert [instruction for instruction, _ in h.pipeline.ran] == ["marker"]


async def test_finished_but_undelivered_job_is_delivered_without_recomputing(tmp_path):
    async with Harness(tmp_path, listener=Recorder(failing_deliveries=3)) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        await eventually(lambda: not h.scheduler._deliveries and h.pipeline.ran)
        assert h.outcomes() == [] and not (await h.store.get(job.id)).delivered  # all three attempts failed

    async with Harness(tmp_path) as h:
        await h.scheduler.start()
        await eventually(lambda: h.outcomes())
        assert h.outcomes() == [("finished", job.id, False)] and h.pipeline.ran == []
        await eventually(lambda: not h.scheduler._deliveries)
        assert (await h.store.get(job.id)).delivered


async def test_delivery_is_retried_and_happens_once(tmp_path):
    async with Harness(tmp_path, listener=Recorder(failing_deliveries=1)) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        await eventually(lambda: job.delivered)
        assert h.outcomes() == [("finished", job.id, False)]


async def test_out_of_memory_fails_one_job_and_the_worker_keeps_serving(tmp_path):
    def step(instruction, i):
        if instruction == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    async with Harness(tmp_path, FakePipeline(step=step)) as h:
        await h.scheduler.start()
        huge = await h.submit(1, "huge")
        fine = await h.submit(2, "fine")
        await eventually(lambda: len(h.outcomes()) == 2)
        assert h.outcomes() == [("failed", huge.id, OOM_MESSAGE), ("finished", fine.id, False)]
        assert (await h.store.get(huge.id)).state is JobState.FAILED


async def test_unexpected_model_error_gives_a_message_and_logs_the_traceback(tmp_path, caplog):
    def step(instruction, i):
        raise RuntimeError("shape mismatch in layer 7")

    async with Harness(tmp_path, FakePipeline(step=step)) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        await eventually(lambda: h.outcomes())
        ((_, _, message),) = h.outcomes()
        assert job.id in message and "shape mismatch" not in message and "Traceback" not in message
        logged = [r for r in caplog.records if r.exc_info and "shape mismatch" in str(r.exc_info[1])]
        assert logged and job.id in logged[0].getMessage()


async def test_a_job_the_scheduler_breaks_on_fails_with_a_message_and_the_next_job_runs(tmp_path, caplog):
    """Not the model: the transport under it raises (a bug, a lost connection no retry covers). The job fails
    with a sentence for its user, instead of staying "running" with no word until the next start."""
    async with Harness(tmp_path) as h:
        run = h.scheduler.runner.run

        async def breaks_on_one(job, events, **kw):
            if job.instruction == "broken":
                raise RuntimeError("the transport broke")
            return await run(job, events, **kw)

        h.scheduler.runner.run = breaks_on_one
        await h.scheduler.start()
        broken = await h.submit(1, "broken")
        fine = await h.submit(2, "fine")
        await eventually(lambda: len(h.outcomes()) == 2)
        assert h.outcomes() == [
            ("failed", broken.id, UNEXPECTED_MESSAGE.format(id=broken.id)),
            ("finished", fine.id, False),
        ]
        stored = await h.store.get(broken.id)
        assert stored.state is JobState.FAILED and stored.error and "transport broke" not in stored.error
        await eventually(lambda: broken.delivered)
        assert "The scheduler failed around job " + broken.id in caplog.text


async def test_resumed_job_whose_clip_is_gone_fails_with_a_clear_message(tmp_path):
    async with Harness(tmp_path) as h:
        job = await h.job(1)
        await h.store.add(job)
        job.input_path.unlink()
        await h.scheduler.start()
        await eventually(lambda: h.outcomes())
        assert h.outcomes() == [("failed", job.id, "The clip of this job is no longer stored; please submit it again.")]


async def test_event_loop_keeps_serving_while_a_job_computes(tmp_path):
    """Each step of the job burns CPU in the model thread until the event loop has passed that step's
    progress to the listener and run ten more of its own timers. A loop blocked by the job could do
    neither: the step would give up, and the test fails. (The loop's stalls are measured, in
    milliseconds, by bench/responsiveness.py.)"""
    loop_ticks = 0
    stalled_at_step: list[int] = []

    def compute_until_the_loop_answers(instruction, i):
        ticks_before = loop_ticks
        give_up = time.monotonic() + 20  # a hang guard, not a speed limit
        while not stalled_at_step and not (loop_ticks >= ticks_before + 10 and len(h.listener.of("progress")) > i):
            if time.monotonic() > give_up:
                stalled_at_step.append(i)
            sum(range(1000))  # pure-Python work: the model thread holds the GIL most of the time

    async with Harness(tmp_path, FakePipeline(steps=3, step=compute_until_the_loop_answers)) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        while not h.outcomes():
            await asyncio.sleep(0.001)
            loop_ticks += 1
        assert stalled_at_step == []
        assert h.outcomes() == [("finished", job.id, False)]
        assert [e[2] for e in h.listener.of("progress")] == [1, 2, 3]


async def test_stop_interrupts_a_running_job_which_resumes_on_next_start(tmp_path):
    started = threading.Event()

    def step(instruction, i):
        started.set()
        time.sleep(0.05)

    async with Harness(tmp_path, FakePipeline(steps=100, step=step)) as h:
        await h.scheduler.start()
        job = await h.submit(1)
        await asyncio.to_thread(started.wait, 10)
    assert h.outcomes() == []

    async with Harness(tmp_path) as h:
        assert (await h.store.get(job.id)).state is JobState.RUNNING
        await h.scheduler.start()
        await eventually(lambda: h.outcomes())
        assert h.outcomes() == [("finished", job.id, True)]


async def test_start_cleans_up_files_past_retention(tmp_path):
    async with Harness(tmp_path, retention_hours=1.0) as h:
        old, recent = await h.job(1), await h.job(2)
        old.state, old.finished_at, old.delivered = JobState.DONE, time.time() - 2 * 3600, True
        recent.state, recent.finished_at, recent.delivered = JobState.DONE, time.time() - 60, True
        for job in (old, recent):
            await h.store.add(job)
        await h.scheduler.start()
        await eventually(lambda: not old.input_path.exists())
        assert recent.input_path.exists()


async def test_caption_job_with_the_real_tiny_pipeline(tmp_path):
    pipeline = Pipeline(Settings(profile="tiny", device="cpu"))
    async with Harness(tmp_path, pipeline) as h:
        await h.scheduler.start()
        job = await h.submit(1, kind=JobKind.CAPTION)
        await eventually(lambda: h.outcomes(), timeout=120)
        assert h.outcomes() == [("finished", job.id, False)]
        lines = (await h.store.get(job.id)).result_json["lines"]
        assert len(lines) == 1 and lines[0].startswith("0:00\u20130:02 ")


async def test_kill_9_during_a_job_loses_nothing_and_delivers_once(tmp_path):
    """A real crash: the worker process is SIGKILLed mid-job; a new process resumes and delivers each job once."""
    async with Harness(tmp_path) as h:
        jobs = [await h.job(1, "first"), await h.job(2, "second")]
        for job in jobs:
            await h.store.add(job)
    log = tmp_path / "events.log"

    def serve(mode: str):
        return asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.test_scheduler",
            str(tmp_path),
            str(log),
            mode,
            cwd=Path(__file__).parent.parent,
        )

    crashing = await serve("slow")
    await eventually(lambda: log.exists() and "ran" in log.read_text(), timeout=60)
    crashing.kill()
    await crashing.wait()
    restarted = await serve("fast")
    assert await asyncio.wait_for(restarted.wait(), 60) == 0

    events = [line.split() for line in log.read_text().splitlines()]
    first_seed = next(seed for kind, job_id, seed in events if kind == "ran")
    assert [e for e in events if e[0] == "finished"] == [
        ["finished", jobs[0].id, "resumed"],
        ["finished", jobs[1].id, "resumed"],
    ]
    assert ["ran", jobs[0].id, first_seed] in events[1:]  # rerun from its start with the seed stored before the crash


class _LoggingListener(Recorder):
    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    async def job_finished(self, job):
        with self.log.open("a") as out:
            out.write(f"finished {job.id} {'resumed' if job.resumed else 'fresh'}\n")


async def _serve_until_delivered(storage: Path, log: Path, mode: str) -> None:
    """The crash test's worker process: `slow` runs until killed, `fast` exits once every job is delivered."""

    def step(instruction, i):
        time.sleep(0.2 if mode == "slow" else 0)

    class LoggingPipeline(FakePipeline):
        def compose(self, clip, instruction, duration=None, seed=None, **kw):
            with log.open("a") as out:
                out.write(f"ran {h.queue.running[0].id} {seed}\n")  # one job at a time (max_batch 1)
            return super().compose(clip, instruction, duration, seed, **kw)

    async with Harness(storage, LoggingPipeline(steps=100, step=step), _LoggingListener(log)) as h:
        await h.scheduler.start()
        while await h.store.unfinished() or await h.store.undelivered():
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(_serve_until_delivered(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))


# --- several jobs at once (settings.max_batch) ----------------------------------------------------


async def test_with_two_slots_jobs_run_together_and_the_order_stays_fair(tmp_path):
    release = threading.Event()
    started = []

    def step(instruction, i):
        started.append(instruction) if i == 0 else None
        release.wait(10)

    async with Harness(tmp_path, FakePipeline(step=step), max_batch=2) as h:
        order, take_next = [], h.queue.next

        async def recorded_next():  # the order the worker starts jobs in (threads may then race)
            job = await take_next()
            order.append(job.instruction)
            return job

        h.queue.next = recorded_next
        await h.scheduler.start()
        for i in range(3):
            await h.submit(1, f"A{i}")
        await eventually(lambda: len(started) == 2)  # both slots busy, neither job finished
        await h.submit(2, "B0")
        assert [j.id for j in h.queue.snapshot().running] == [j.id for j in h.queue.running] and len(
            h.queue.running
        ) == 2
        assert [e.job.instruction for e in h.queue.snapshot().queued] == ["B0", "A2"]
        release.set()
        await eventually(lambda: len(h.outcomes()) == 4)
    assert order == ["A0", "A1", "B0", "A2"]


async def test_cancelling_one_of_two_running_jobs_leaves_the_other_running(tmp_path):
    release = threading.Event()
    async with Harness(
        tmp_path, FakePipeline(steps=50, step=lambda instruction, i: release.wait(0.05)), max_batch=2
    ) as h:
        await h.scheduler.start()
        keep, stop = await h.submit(1, "keep"), await h.submit(2, "stop")
        await eventually(lambda: len(h.queue.running) == 2)
        await h.scheduler.cancel(stop.id, 2)
        await eventually(lambda: len(h.outcomes()) == 2)
    assert sorted(h.outcomes()) == sorted([("cancelled", stop.id), ("finished", keep.id, False)])


async def test_stopping_leaves_every_running_job_to_resume(tmp_path):
    release = threading.Event()
    async with Harness(
        tmp_path, FakePipeline(step=lambda instruction, i: release.wait(0.05), steps=200), max_batch=2
    ) as h:
        await h.scheduler.start()
        jobs = [await h.submit(1, "one"), await h.submit(2, "two")]
        await eventually(lambda: len(h.queue.running) == 2)
    async with Harness(tmp_path) as h:
        assert {j.id for j in await h.store.unfinished()} == {j.id for j in jobs}


async def test_a_fixed_seed_gives_every_job_built_on_a_track_a_seed_of_its_own(tmp_path):
    """MTM_SEED: a compose job takes it; a Reroll or Redo takes one drawn from it and its own job id, so
    each is a new take (the fixed seed would repeat the track), and a resumed one replays the same."""
    from mtm_bot.core.seeds import choose_seed

    async with Harness(tmp_path, seed=7) as h:
        await h.scheduler.start()
        compose = await h.submit(1)
        derived = []
        for kind in (JobKind.REROLL, JobKind.REROLL, JobKind.REDO):
            job = await h.job(1, kind=kind)
            job.parent_id = compose.id
            await h.scheduler.submit(job)
            derived.append(job)
        await eventually(lambda: len(h.outcomes()) == 4)
        seeds = [(await h.store.get(job.id)).seed for job in (compose, *derived)]
    assert seeds[0] == 7
    assert len(set(seeds)) == 4
    assert seeds[1:] == [choose_seed(7, job.id) for job in derived]
