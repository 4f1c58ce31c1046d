"""Job store (SQLite + files) and the fair queue with its limits."""

import os
import time

import pytest

from mtm_bot.core.errors import InputError
from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import Job, JobKind, JobState
from mtm_bot.jobs.queue import JobQueue, QueueFull, TooManyJobs
from mtm_bot.jobs.store import JobStore
from mtm_bot.stages.kept import ResultExpired


def make_job(user_id: int, kind: JobKind = JobKind.COMPOSE, duration: int | None = 10, **changes) -> Job:
    job = Job.new(
        kind,
        user_id=user_id,
        guild_id=1,
        channel_id=2,
        instruction="cosy jazz",
        duration=duration,
        attachment_size_limit=10 * 1024 * 1024,
        application_id=3,
        interaction_token="tok",
    )
    for name, value in changes.items():
        setattr(job, name, value)
    return job


@pytest.fixture
async def store(tmp_path):
    store = await JobStore.open(Settings(storage_dir=tmp_path, retention_hours=48))
    yield store
    await store.close()


def queue_of(**limits) -> JobQueue:
    return JobQueue(Settings(**{"max_jobs_per_user": 10, "max_queue_length": 50, **limits}))


async def test_store_round_trip_survives_reopen(tmp_path):
    settings = Settings(storage_dir=tmp_path)
    store = await JobStore.open(settings)
    job = make_job(7, seed=1234, result_json={"lines": ["0:00\u20130:10 jazz"]}, result_path=tmp_path / "x.wav")
    await store.add(job)
    job.state = JobState.DONE
    job.finished_at = time.time()
    await store.update(job)
    await store.close()

    reopened = await JobStore.open(settings)
    loaded = await reopened.get(job.id)
    await reopened.close()
    assert loaded == job
    assert len(job.id) == 8 and job.kind is JobKind.COMPOSE


async def test_unfinished_and_undelivered(store):
    queued, running, done, delivered = (make_job(1) for _ in range(4))
    running.state = JobState.RUNNING
    for job, state in ((done, JobState.DONE), (delivered, JobState.FAILED)):
        job.state, job.finished_at = state, time.time()
    for job in (queued, running, done, delivered):
        await store.add(job)
    await store.mark_delivered(delivered.id)

    assert [j.id for j in await store.unfinished()] == [queued.id, running.id]
    assert [j.id for j in await store.undelivered()] == [done.id]


async def test_input_named_by_job_id_never_by_user_filename(store):
    job = make_job(1)
    path = await store.save_input(job.id, b"RIFF....", "../../etc/passwd my song.WAV")
    assert path == store.inputs_dir / f"{job.id}.wav"
    assert path.read_bytes() == b"RIFF...."
    odd = await store.save_input("abcd0000", b"x", "clip.wav;rm -rf")
    assert odd == store.inputs_dir / "abcd0000"
    assert sorted(p.name for p in store.inputs_dir.iterdir()) == sorted([path.name, "abcd0000"])


async def test_cleanup_deletes_old_files_keeps_recent_and_unfinished(store):
    now = time.time()
    old, recent, waiting = make_job(1), make_job(2), make_job(3)
    old.state, old.finished_at = JobState.DONE, now - 100 * 3600
    recent.state, recent.finished_at = JobState.DONE, now - 3600
    waiting.created_at = now - 100 * 3600  # queued a long time ago: its clip must survive
    for job in (old, recent, waiting):
        job.input_path = await store.save_input(job.id, b"data", "clip.wav")
        await store.add(job)
    for job in (old, recent):
        store.output_path(job.id).write_bytes(b"track")
    orphan_old = await store.save_input("0rphan01", b"x", "a.wav")
    os.utime(orphan_old, (now - 100 * 3600, now - 100 * 3600))
    orphan_new = await store.save_input("0rphan02", b"x", "a.wav")

    deleted = await store.cleanup(before=now - 72 * 3600)

    assert deleted == 3
    assert not old.input_path.exists() and not store.output_path(old.id).exists() and not orphan_old.exists()
    assert recent.input_path.exists() and store.output_path(recent.id).exists() and orphan_new.exists()
    assert waiting.input_path.exists()
    assert await store.get(old.id) is None
    assert await store.get(recent.id) is not None


async def test_a_derived_job_links_its_parents_kept_files_and_outlives_them(store):
    parent = make_job(7, state=JobState.DONE, finished_at=time.time())
    parent.input_path = await store.save_input(parent.id, b"clip", "hum.ogg")
    kept = store.kept_files(parent)
    kept.track.write_bytes(b"track")
    kept.state.write_bytes(b"state")
    await store.add(parent)
    assert (await store.parent_for(parent.id)).id == parent.id

    child = make_job(8, JobKind.EXTEND, parent_id=parent.id)
    await store.link_parent(child, parent)
    own = store.parent_files(child)
    assert [p.read_bytes() for p in (own.track, own.state, own.clip)] == [b"track", b"state", b"clip"]
    assert own.clip.name == f"{child.id}.ogg"
    await store.delete_files(parent.id)  # the parent's retention ends first
    assert own.exist()

    with pytest.raises(ResultExpired, match="expired: tracks are kept for 2 days"):
        await store.parent_for(parent.id)  # its files are gone
    with pytest.raises(ResultExpired, match="expired"):
        await store.parent_for("0badf00d")  # its row is gone too
    unfinished = make_job(7)
    await store.add(unfinished)
    with pytest.raises(ResultExpired):
        await store.parent_for(unfinished.id)  # nothing to build on before it has finished


async def test_round_robin_across_users_fifo_within_user():
    queue = queue_of()
    a1, a2, a3, b1, c1 = make_job(1), make_job(1), make_job(1), make_job(2), make_job(3)
    for job in (a1, a2, a3, b1, c1):
        queue.submit(job)
    assert [await queue.next() for _ in range(5)] == [a1, b1, c1, a2, a3]


async def test_user_submitting_after_a_busy_user_runs_next():
    queue = queue_of()
    a = [make_job(1) for _ in range(3)]
    for job in a:
        queue.submit(job)
    assert await queue.next() is a[0]  # the worker was idle: A's first job starts at once
    b = make_job(2)
    assert queue.submit(b) == 1  # B does not wait behind A's other two jobs
    queue.finish(a[0])
    assert await queue.next() is b
    assert queue.position(a[1].id) == 1 and queue.position(a[2].id) == 2


async def test_per_user_limit_counts_running_jobs_and_names_the_limit():
    queue = queue_of(max_jobs_per_user=2)
    queue.submit(make_job(1))
    await queue.next()
    queue.submit(make_job(1))
    with pytest.raises(TooManyJobs, match="limit is 2") as refused:
        queue.submit(make_job(1))
    assert isinstance(refused.value, InputError) and "/cancel" in str(refused.value)
    assert queue.submit(make_job(2)) == 1  # other users are not affected, and go before user 1


async def test_queue_length_limit_names_the_limit_and_when_to_retry():
    queue = queue_of(max_queue_length=2)
    running = make_job(9)
    queue.submit(running)
    await queue.next()
    running.started_at = time.time()
    queue.estimate.seconds_per_output_second = 30.0  # 10 s output -> 5 minutes
    queue.submit(make_job(1))
    queue.submit(make_job(2))
    with pytest.raises(QueueFull, match="limit is 2") as refused:
        queue.submit(make_job(3))
    assert "try again in about 5 minutes" in str(refused.value)


async def test_remove_shifts_positions_and_eta_follows_the_estimate():
    queue = queue_of(max_batch=1)
    first, second, third = make_job(1), make_job(2), make_job(3)
    for job in (first, second, third):
        queue.submit(job)
    assert queue.eta(third.id) is None  # nothing measured yet: no made-up number
    queue.finish(make_job(4, duration=20), wall_seconds=40.0)  # 2 s per output second
    assert queue.eta(third.id) == pytest.approx(40.0)
    assert queue.remove(second.id) is second
    assert queue.position(third.id) == 2
    assert queue.eta(third.id) == pytest.approx(20.0)
    assert [e.job for e in queue.snapshot().queued] == [first, third]


async def test_with_room_for_two_jobs_each_waiting_job_takes_the_slot_that_frees_first():
    queue = queue_of(max_batch=2)
    queue.estimate.seconds_per_output_second = 1.0
    long, short = make_job(1, duration=60), make_job(2, duration=20)
    for job in (long, short):
        queue.submit(job)
        (await queue.next()).started_at = time.time()
    assert queue.running == [long, short]
    third, fourth, fifth = make_job(3, duration=30), make_job(4, duration=10), make_job(5)
    for job in (third, fourth, fifth):
        queue.submit(job)
    starts = [e.starts_in for e in queue.snapshot().queued]
    assert starts == [pytest.approx(20, abs=1), pytest.approx(50, abs=1), pytest.approx(60, abs=1)]
    assert queue.eta(short.id) == 0.0
    queue.max_per_user = 1
    with pytest.raises(TooManyJobs):  # a running job counts towards its user's limit, as before
        queue.check(long.user_id)


async def test_recent_instructions_are_this_servers_compose_instructions_newest_first_each_once(store):
    def compose(instruction: str, created_at: float, guild_id: int = 1, kind: JobKind = JobKind.COMPOSE) -> Job:
        return make_job(7, kind, instruction=instruction, created_at=created_at, guild_id=guild_id)

    for job in (
        compose("cosy jazz", 1),
        compose("Stone church CHOIR", 2),
        compose("cosy jazz", 3),
        compose("a" * 101, 4),
        compose("other server's polka", 5, guild_id=2),
        compose("remixed as metal", 6, kind=JobKind.REMIX),
        compose("", 7, kind=JobKind.CAPTION),
    ):
        await store.add(job)
    assert await store.recent_instructions(1, "", max_chars=100, limit=25) == ["cosy jazz", "Stone church CHOIR"]
    assert await store.recent_instructions(1, "", max_chars=200, limit=1) == ["a" * 101]
    assert await store.recent_instructions(1, "church choir", max_chars=100, limit=25) == ["Stone church CHOIR"]
    assert await store.recent_instructions(2, "", max_chars=100, limit=25) == ["other server's polka"]


async def test_a_compose_jobs_takes_become_finished_jobs_once_with_their_own_files(store):
    """Takes 2..N get jobs of their own (ids derived from the job's, so a rerun after a restart names them the
    same) with the take's files; recording them again, as a job that ran twice would, adds no job."""
    from mtm_bot.jobs.job import take_id

    job = make_job(1, takes=3, state=JobState.DONE)
    await store.add(job)

    def finish() -> None:
        job.result_json = {
            "lines": ["take 1"],
            "take": [1, 3],
            "takes": [{"lines": [f"take {k}"], "take": [k, 3]} for k in (2, 3)],
        }
        for k in (2, 3):
            for suffix in (".wav", ".kept.npz"):
                store.output_path(job.id, f".take{k}{suffix}").write_bytes(f"{k}{suffix}".encode())

    finish()
    recorded = await store.record_takes(job)
    assert [take.id for take in recorded] == [take_id(job.id, 2), take_id(job.id, 3)]
    assert job.result_json["takes"] == [take.id for take in recorded]
    for take in recorded:
        stored = await store.get(take.id)
        k = stored.result_json["take"][0]
        assert stored.state is JobState.DONE and not stored.delivered and stored.takes == 1
        assert stored.result_path.read_bytes() == f"{k}.wav".encode()
        assert store.output_path(take.id, ".kept.npz").read_bytes() == f"{k}.kept.npz".encode()
        assert not store.output_path(job.id, f".take{k}.wav").exists()
    finish()  # the job ran again after a restart: the same takes, recorded already
    assert await store.record_takes(job) == []
