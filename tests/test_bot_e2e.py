"""End to end: the real bot (discord.py client, cogs, worker, tiny pipeline) against the loopback emulator.

One bot and one loaded tiny pipeline serve the whole module; tests run in file order and each waits
until its jobs are finished, so the queue is empty for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import soundfile as sf
from discord_emulator import CHANNEL_MESSAGE, DiscordEmulator, FakeUser, Interaction, Message
from synth import bad_files, music

from bot import MTMBot, point_discord_at
from mtm_bot.core.audio import load_clip
from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import Job, JobKind, JobState
from mtm_bot.jobs.store import JobStore

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOB_SECONDS = 300  # generous (a tiny job takes seconds), and under pytest-timeout's 600 s so that a wait that
# fails raises in the test, whose clean-up then runs (a timed-out test abandons its bot, threads and all)
LINE = re.compile(r"^\d+:\d\d–\d+:\d\d \S", re.M)


def wav_bytes(seconds: float, seed: int = 0, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, music(seconds, rate, seed=seed), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def connect_bot(
    emulator: DiscordEmulator,
    storage: Path,
    guild_commands: bool = True,
    connector: aiohttp.BaseConnector | None = None,
    **env: str,
) -> tuple[MTMBot, asyncio.Task]:
    """The real bot (tiny pipeline) started in this process and connected to `emulator`; commands synced to
    the emulator's guild, or globally (as for a bot in many servers) with guild_commands=False. `connector`
    replaces discord.py's HTTP connector (one that trusts the loopback voice server's certificate)."""
    # One job at a time unless a module asks for more (MTM_MAX_BATCH): these tests watch jobs wait in the queue.
    env = {
        **emulator.env(),
        "MTM_PROFILE": "tiny",
        "MTM_DEVICE": "cpu",
        "MTM_STORAGE_DIR": str(storage),
        "MTM_SUBMISSIONS_PER_MINUTE": "100",
        "MTM_SEED": "1",
        "MTM_MAX_BATCH": "1",
        **env,
    }
    if not guild_commands:
        del env["MTM_GUILD_ID"]
    settings = Settings.from_env({k: v for k, v in env.items() if v}, env_file=None)
    point_discord_at(settings)
    bot = MTMBot(settings)
    if connector is not None:
        bot.http.connector = connector
    identified = emulator.identifies
    runner = asyncio.create_task(bot.start(settings.discord_token))
    await emulator.wait_for(
        lambda: runner.done() or (emulator.identifies > identified and emulator.commands), 300, "bot start"
    )
    if runner.done():
        runner.result()  # raises the start-up error
    return bot, runner


async def disconnect_bot(bot: MTMBot, runner: asyncio.Task) -> None:
    await bot.close()
    await asyncio.wait_for(runner, 30)


@contextlib.asynccontextmanager
async def running_bot(storage: Path, guild_commands: bool = True) -> AsyncIterator[tuple[DiscordEmulator, MTMBot]]:
    """The emulator and the real bot connected to it (connect_bot)."""
    emulator = await DiscordEmulator().start()
    bot, runner = await connect_bot(emulator, storage, guild_commands)
    yield emulator, bot
    await disconnect_bot(bot, runner)
    await emulator.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    async with running_bot(tmp_path_factory.mktemp("storage")) as world:
        yield world


def results_for(emulator: DiscordEmulator, user: FakeUser) -> list[Message]:
    """Public messages that address `user` with a finished job."""
    return [
        m
        for m in emulator.messages
        if m.via in ("followup", "channel")
        and not m.ephemeral
        and m.content.startswith(user.mention)
        and "job `" in m.content
    ]


def pings(message: Message) -> tuple[set[str], set[str]]:
    """What a message may ping: (kinds parsed from its text, explicitly allowed user ids)."""
    allowed = message.allowed_mentions
    assert allowed is not None, f"no allowed_mentions sent with {message.content!r}"
    assert not allowed.get("roles") and not allowed.get("replied_user")
    return set(allowed.get("parse", [])), {str(u) for u in allowed.get("users", [])}


async def accepted(emulator: DiscordEmulator, interaction: Interaction) -> str:
    """Wait for the public reply that accepts a job; return the job id it shows."""

    def acceptance() -> str | None:
        states = interaction.response.history if interaction.response else []
        return next((h["content"] for h in states if "job `" in h["content"]), None)

    text = await emulator.wait_for(acceptance, 120, f"/{interaction.command} accepted")
    # Like Discord, the emulator refuses a callback after 3 s (a callback error); bench/responsiveness.py
    # measures how fast the acknowledgement really comes.
    assert not interaction.callback_errors, interaction.callback_errors
    assert interaction.deferred and not interaction.response.ephemeral
    return re.search(r"job `([0-9a-f]{8})`", text).group(1)


async def ephemeral_error(emulator: DiscordEmulator, interaction: Interaction) -> str:
    """Wait for the error reply; it must be the only thing the interaction left, and ephemeral."""
    await emulator.wait_for(
        lambda: any(m.ephemeral and m.content and not m.thinking for m in interaction.visible_messages()),
        60,
        "an ephemeral error",
    )
    visible = interaction.visible_messages()
    assert all(m.ephemeral for m in visible), [m.content for m in visible]
    assert interaction.callback_type is not None and not interaction.callback_errors, interaction.callback_errors
    return visible[-1].content


async def every_job_settled(store: JobStore, timeout: float = JOB_SECONDS) -> None:
    """Wait until the store holds no unfinished and no undelivered job. A job is marked delivered only after
    its outcome was posted, so from then on every message a job could post is in the emulator's record."""

    async def settled() -> None:
        while await store.unfinished() or await store.undelivered():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(settled(), timeout)
    except TimeoutError:
        raise AssertionError(f"jobs still unfinished or undelivered after {timeout} s") from None


async def test_commands_are_registered_with_their_bounds(world):
    emulator, bot = world
    commands = {c["name"]: c for c in emulator.commands[str(emulator.guild_id)]}
    assert set(commands) == {"compose", "caption", "queue", "cancel", "library", "help", "Compose from this"}
    options = {o["name"]: o for o in commands["compose"]["options"]}
    assert options["duration"]["min_value"] == 10
    assert options["duration"]["max_value"] == bot.settings.max_output_seconds
    assert not options["duration"].get("required") and not options["audio"].get("required")
    assert not options["image"].get("required") and options["image"]["type"] == 11
    assert options["audio"]["type"] == 11 and options["instruction"]["required"]


async def test_help_is_ephemeral(world):
    emulator, _ = world
    interaction = await emulator.slash(emulator.user("reader"), "help")
    await emulator.wait_for(lambda: interaction.response, 10, "/help reply")
    assert interaction.response.ephemeral and "/compose" in interaction.response.content
    assert pings(interaction.response) == (set(), set())


async def test_gateway_reconnect_resumes_the_session(world):
    emulator, _ = world
    await emulator.reconnect()
    await emulator.wait_for(lambda: emulator.resumes == 1 and emulator.connected, 30, "RESUME")
    assert emulator.identifies == 1  # resumed, not a new session
    interaction = await emulator.slash(emulator.user("after-resume"), "help")
    await emulator.wait_for(lambda: interaction.response, 10, "/help after the resume")


async def test_two_users_compose_at_once_and_nobody_else_is_pinged(world):
    emulator, _ = world
    alice, bob = emulator.user("alice"), emulator.user("bob")
    instruction = "a cosy jazz carol @everyone <@123456789> <@&42> with sleigh bells"
    small_limit = 120_000  # a 10 s WAV is 640 kB: bob's track must come compressed
    first, second = await asyncio.gather(
        emulator.slash(
            alice,
            "compose",
            {"instruction": instruction, "duration": 10},
            attachment=(wav_bytes(3.0), "carol.wav", "audio/x-wav"),
        ),
        emulator.slash(
            bob,
            "compose",
            {"instruction": "dark techno", "duration": 10},
            attachment=(wav_bytes(12.0, seed=2), "loop.wav", "audio/wav"),
            attachment_size_limit=small_limit,
        ),
    )
    alice_job, bob_job = await accepted(emulator, first), await accepted(emulator, second)
    assert alice_job != bob_job

    await emulator.wait_for(
        lambda: results_for(emulator, alice) and results_for(emulator, bob), JOB_SECONDS, "both results"
    )
    for user, job_id, limit in ((alice, alice_job, emulator.attachment_size_limit), (bob, bob_job, small_limit)):
        (result,) = results_for(emulator, user)
        assert result.via == "followup" and not result.ephemeral
        assert f"`{job_id}`" in result.content
        assert pings(result) == (set(), {str(user.id)})
        lines = LINE.findall(result.text())
        assert len(lines) == 1 and result.text().count("0:00–0:10 ") == 1
        (track,) = result.files
        assert len(track.data) <= limit
        audio, rate = sf.read(io.BytesIO(track.data))
        assert abs(len(audio) / rate - 10.0) < 0.05
    assert results_for(emulator, alice)[0].files[0].filename.endswith(".wav")
    assert not results_for(emulator, bob)[0].files[0].filename.endswith(".wav")
    assert "@everyone" in results_for(emulator, alice)[0].content  # shown, but it pings nobody

    # The accepting reply ends as "done" (the live stages are checked on a longer job below).
    history = [h["content"] for h in first.response.history]
    assert "done" in history[-1]
    edits = [h["at"] for h in first.response.history[1:]]  # [0] is the deferred "thinking" reply
    assert all(b - a >= 1.9 for a, b in zip(edits, edits[1:])), "status edits must be throttled to one per 2 s"
    # Every message except the two results pings nobody.
    for message in emulator.messages:
        if message not in results_for(emulator, alice) + results_for(emulator, bob):
            assert pings(message) == (set(), set()), (message.content, message.allowed_mentions)


async def test_caption_only(world):
    emulator, _ = world
    carol = emulator.user("carol")
    interaction = await emulator.slash(carol, "caption", attachment=(wav_bytes(3.0, seed=3), "hum.flac", None))
    job_id = await accepted(emulator, interaction)
    (result,) = await emulator.wait_for(lambda: results_for(emulator, carol), JOB_SECONDS, "captions")
    assert f"`{job_id}`" in result.content and not result.files
    assert LINE.findall(result.text()) and "0:00–0:03 " in result.text()
    assert pings(result) == (set(), {str(carol.id)})


async def test_bad_inputs_get_specific_ephemeral_errors_and_the_bot_keeps_serving(world, tmp_path):
    emulator, _ = world
    dave = emulator.user("dave")
    for name, (path, error) in bad_files(tmp_path).items():
        with pytest.raises(error) as expected:
            load_clip(path)
        interaction = await emulator.slash(
            dave, "compose", {"instruction": "lofi"}, attachment=(path.read_bytes(), path.name, "audio/wav")
        )
        text = await ephemeral_error(emulator, interaction)
        assert str(expected.value) in text, (name, text)

    # Refused from metadata alone: nothing is downloaded.
    downloads = len(emulator.cdn_downloads)
    too_big = await emulator.slash(
        dave,
        "compose",
        {"instruction": "lofi"},
        attachment=(b"RIFF", "huge.wav", "audio/wav"),
        declared_size=200 * 1024 * 1024,
    )
    assert "limit is 25 MB" in await ephemeral_error(emulator, too_big)
    picture = await emulator.slash(dave, "caption", attachment=(b"\x89PNG", "cat.png", "image/png"))
    assert "not audio" in await ephemeral_error(emulator, picture)
    assert len(emulator.cdn_downloads) == downloads

    # And the next good request is served.
    interaction = await emulator.slash(dave, "caption", attachment=(wav_bytes(2.0), "ok.wav", "audio/wav"))
    await accepted(emulator, interaction)
    await emulator.wait_for(lambda: results_for(emulator, dave), JOB_SECONDS, "dave's captions")


async def test_submission_rate_limit_says_when_to_retry(world):
    emulator, bot = world
    erin = emulator.user("erin")
    strict = dataclasses.replace(bot.settings, submissions_per_minute=1)
    bot.settings, relaxed = strict, bot.settings
    try:
        first = await emulator.slash(erin, "caption", attachment=(b"not audio", "a.txt", "text/plain"))
        await ephemeral_error(emulator, first)  # refused, but it counted as a submission
        second = await emulator.slash(
            erin,
            "compose",
            {"instruction": "jazz"},  # one budget for both commands
            attachment=(wav_bytes(2.0), "b.wav", "audio/wav"),
        )
        text = await ephemeral_error(emulator, second)
    finally:
        bot.settings = relaxed
    assert "1 per minute" in text and re.search(r"try again in \d+ s", text), text


async def test_cancel_queued_and_running_jobs_failures_and_expired_tokens(world):
    emulator, bot = world
    frank, grace, heidi, ivan = (emulator.user(name) for name in ("frank", "grace", "heidi", "ivan"))
    stranger, manager = emulator.user("stranger"), emulator.user("mod", manage_guild=True)

    # The longest track: 18 blocks keep the job running long enough to watch it and cancel it.
    running = await emulator.slash(
        frank,
        "compose",
        {"instruction": "epic orchestral", "duration": 180},
        attachment=(wav_bytes(3.0), "a.wav", "audio/wav"),
    )
    running_id = await accepted(emulator, running)
    queued = await emulator.slash(grace, "caption", attachment=(wav_bytes(2.0), "b.wav", "audio/wav"))
    queued_id = await accepted(emulator, queued)
    assert "position 1 in the queue" in queued.response.content

    second = await emulator.slash(frank, "caption", attachment=(wav_bytes(2.0), "e.wav", "audio/wav"))
    await accepted(emulator, second)
    downloads = len(emulator.cdn_downloads)
    third = await emulator.slash(frank, "caption", attachment=(wav_bytes(2.0), "f.wav", "audio/wav"))
    assert "the limit is 2 per user" in await ephemeral_error(emulator, third)
    assert third.callback_type == CHANNEL_MESSAGE and len(emulator.cdn_downloads) == downloads  # no defer, no download
    nothing = await emulator.slash(stranger, "cancel")
    assert "no queued or running job" in await ephemeral_error(emulator, nothing)
    expiring = await emulator.slash(heidi, "caption", attachment=(wav_bytes(2.0, seed=5), "c.wav", "audio/wav"))
    await accepted(emulator, expiring)
    emulator.expire_tokens(expiring, status=401)  # as if heidi's job had waited more than 15 minutes
    failing = await emulator.slash(ivan, "caption", attachment=(wav_bytes(2.0, seed=6), "d.wav", "audio/wav"))
    failing_id = await accepted(emulator, failing)
    for path in bot.store.inputs_dir.glob(f"{failing_id}.*"):
        path.unlink()  # ivan's job will fail when it runs: its clip is gone

    queue = await emulator.slash(grace, "queue")
    await emulator.wait_for(lambda: queue.response, 10, "/queue")
    assert queue.response.ephemeral and running_id in queue.response.content and queued_id in queue.response.content

    cancel_own = await emulator.slash(grace, "cancel")  # default: her newest unfinished job
    await emulator.wait_for(lambda: cancel_own.response, 10, "/cancel reply")
    assert cancel_own.response.ephemeral and queued_id in cancel_own.response.content
    await emulator.wait_for(lambda: "cancelled" in queued.response.content, 30, "queued job shown cancelled")

    # Live progress: the reply shows the block being generated and the refined captions, one per block.
    await emulator.wait_for(lambda: "generating block" in running.response.text(), JOB_SECONDS, "generation")
    assert "/18" in running.response.text() and len(LINE.findall(running.response.text())) == 18
    refused = await emulator.slash(stranger, "cancel", {"job": running_id})
    await emulator.wait_for(lambda: refused.response, 10, "refusal")
    assert refused.response.ephemeral and "someone else's" in refused.response.content
    by_manager = await emulator.slash(manager, "cancel", {"job": running_id})
    await emulator.wait_for(lambda: by_manager.response, 10, "manager's /cancel")
    assert by_manager.response.ephemeral and running_id in by_manager.response.content
    await emulator.wait_for(lambda: "cancelled" in running.response.content, 60, "running job shown cancelled")

    (result,) = await emulator.wait_for(lambda: results_for(emulator, heidi), JOB_SECONDS, "heidi's captions")
    assert result.via == "channel" and pings(result) == (set(), {str(heidi.id)})

    await emulator.wait_for(lambda: len(failing.visible_messages()) == 2, JOB_SECONDS, "ivan's failure")
    status, reason = failing.visible_messages()
    assert "failed" in status.content and not status.ephemeral
    assert reason.ephemeral and "no longer stored" in reason.content

    await emulator.wait_for(lambda: results_for(emulator, frank), JOB_SECONDS, "frank's second job")
    await every_job_settled(bot.store)  # a stray result would be on record by now
    assert len(results_for(emulator, frank)) == 1 and "caption" in results_for(emulator, frank)[0].content
    assert not results_for(emulator, grace) and not results_for(emulator, ivan)
    assert not emulator.refused


async def test_long_captions_fit_discords_limits_and_an_unfittable_track_is_explained(world, tmp_path):
    """Delivery of a finished job with no live interaction (as after a restart): 18 long caption
    lines and a track that fits no encoding within a tiny upload limit."""
    emulator, bot = world
    judy = emulator.user("judy")
    job = Job.new(
        JobKind.COMPOSE,
        user_id=judy.id,
        guild_id=emulator.guild_id,
        channel_id=emulator.channel_id,
        instruction="x" * 500,
        duration=180,
        attachment_size_limit=4_000,
        application_id=emulator.application_id,
        interaction_token="never-issued",
    )
    job.state, job.resumed = JobState.DONE, True
    job.result_path = tmp_path / "track.wav"
    sf.write(job.result_path, music(180.0, 32000), 32000, subtype="PCM_16")
    lines = [f"{i // 6}:{i % 6}0–{(i + 1) // 6}:{(i + 1) % 6}0 " + "a very detailed caption " * 15 for i in range(18)]
    job.result_json = {"lines": lines}

    await bot.delivery.job_finished(job)
    (result,) = results_for(emulator, judy)
    assert result.via == "channel" and not result.files and "does not fit" in result.content
    assert "restart" in result.content
    assert len(result.content) <= 2000 and result.embeds
    assert "…" in result.text() and "0:00–0:10 a very detailed caption" in result.text()
    assert not emulator.refused


async def test_a_job_whose_gpu_call_hangs_fails_with_a_sentence_and_the_bot_serves_on(tmp_path, monkeypatch):
    """One process (no GPU workers): a job whose model call never returns (a hung GPU; it ignores its cancel)
    fails after MTM_STALL_SECONDS with a sentence for its requester, and its stuck thread keeps its slot: the
    other jobs go on in the slots left."""
    import threading
    import time

    emulator = await DiscordEmulator().start()
    bot, runner = await connect_bot(emulator, tmp_path / "storage", MTM_STALL_SECONDS="2", MTM_MAX_BATCH="2")
    hung, release = threading.Event(), threading.Event()
    caption = bot.pipeline.caption
    hung_at: list[float] = []

    def hangs_the_first_time(*args, **kwargs):
        if not hung.is_set():
            hung_at.append(time.monotonic())
            hung.set()
            release.wait(120)
            raise RuntimeError("released at the end of the test")
        return caption(*args, **kwargs)

    monkeypatch.setattr(bot.pipeline, "caption", hangs_the_first_time)
    try:
        ivan, judy = emulator.user("ivan"), emulator.user("judy")
        stuck = await emulator.slash(ivan, "caption", attachment=(wav_bytes(2.0, seed=6), "d.wav", "audio/wav"))
        stuck_id = await accepted(emulator, stuck)
        await emulator.wait_for(lambda: len(stuck.visible_messages()) == 2, 60, "ivan's failure")
        assert time.monotonic() - hung_at[0] >= 2
        status, reason = stuck.visible_messages()
        assert "failed" in status.content and not status.ephemeral
        assert reason.ephemeral and f"Job {stuck_id} made no progress for 2 s" in reason.content
        assert bot.scheduler.runner.capacity == 1 and bot.queue.capacity == 1  # the stuck thread's slot is gone
        later = await emulator.slash(judy, "caption", attachment=(wav_bytes(2.0, seed=7), "e.wav", "audio/wav"))
        await accepted(emulator, later)
        await emulator.wait_for(lambda: results_for(emulator, judy), JOB_SECONDS, "judy's captions")
        assert (await bot.store.get(stuck_id)).state is JobState.FAILED and not results_for(emulator, ivan)
    finally:
        release.set()
        await disconnect_bot(bot, runner)
        await emulator.stop()
