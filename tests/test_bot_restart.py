"""`python bot.py` as users run it: refusing to start without a token, and surviving a kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from discord_emulator import DiscordEmulator, FakeUser, Message
from test_bot_e2e import JOB_SECONDS, LINE, accepted, every_job_settled, pings, results_for, wav_bytes

from mtm_bot.core.settings import Settings
from mtm_bot.jobs.job import JobState
from mtm_bot.jobs.store import JobStore

ROOT = Path(__file__).resolve().parents[1]
BOT = [sys.executable, str(ROOT / "bot.py")]
TOKEN = "secret-emulator-token-9f8e7d"


def bot_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MTM_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_refuses_to_start_without_a_token(tmp_path):
    done = subprocess.run(BOT, cwd=tmp_path, env=bot_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "DISCORD_TOKEN is not set" in done.stderr and "discord.com/developers" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


async def test_refuses_a_wrong_token_with_a_clear_message(tmp_path):
    emulator = await DiscordEmulator(valid_token="the-right-one").start()
    try:
        env = bot_env(**emulator.env("a-wrong-token"), MTM_STORAGE_DIR=str(tmp_path / "storage"))
        process = await asyncio.create_subprocess_exec(
            *BOT, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        await emulator.stop()
    assert process.returncode == 2
    assert "refused DISCORD_TOKEN" in err.decode() and "Traceback" not in (out + err).decode()
    assert "a-wrong-token" not in (out + err).decode()


async def start_bot(
    emulator: DiscordEmulator, storage: Path, log: Path, connected: bool = True, **extra: str
) -> asyncio.subprocess.Process:
    """`python bot.py` on the tiny profile, connected to the emulator (unless `connected` is False: it may be
    waiting for something first). One job at a time unless `extra` says otherwise."""
    env = bot_env(
        **{
            **emulator.env(TOKEN),
            "MTM_PROFILE": "tiny",
            "MTM_DEVICE": "cpu",
            "MTM_STORAGE_DIR": str(storage),
            "MTM_SEED": "1",
            "MTM_MAX_BATCH": "1",
            **extra,
        }
    )
    identified = emulator.identifies
    with open(log, "ab") as out:
        process = await asyncio.create_subprocess_exec(
            *BOT, cwd=storage.parent, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if not connected:
        return process
    try:
        await emulator.wait_for(
            lambda: process.returncode is not None or emulator.identifies > identified, 300, "the bot to connect"
        )
    except AssertionError:
        process.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    assert process.returncode is None, log.read_text()[-3000:]
    return process


def resumed_result(emulator: DiscordEmulator, user: FakeUser) -> list[Message]:
    return [m for m in results_for(emulator, user) if "restart" in m.content]


async def test_kill_9_then_restart_delivers_the_running_and_the_queued_job_once(tmp_path):
    emulator = await DiscordEmulator().start()
    storage, log = tmp_path / "storage", tmp_path / "bot.log"
    alice, bob = emulator.user("alice"), emulator.user("bob")
    processes = []
    try:
        first = await start_bot(emulator, storage, log)
        processes.append(first)
        await emulator.wait_for(lambda: emulator.commands, 60, "command sync")
        running = await emulator.slash(
            alice,
            "compose",
            {"instruction": "sea shanty", "duration": 60},
            attachment=(wav_bytes(3.0), "a.wav", "audio/wav"),
        )
        running_id = await accepted(emulator, running)
        queued = await emulator.slash(bob, "caption", attachment=(wav_bytes(2.0, seed=4), "b.wav", "audio/wav"))
        queued_id = await accepted(emulator, queued)
        store = await JobStore.open(Settings(storage_dir=storage))  # a second reader of the bot's database

        async def running_now() -> None:
            while (await store.get(running_id)).state is not JobState.RUNNING:
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(running_now(), JOB_SECONDS)
            assert (await store.get(queued_id)).state is JobState.QUEUED
        finally:
            await store.close()

        first.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        assert not results_for(emulator, alice) and not results_for(emulator, bob)

        second = await start_bot(emulator, storage, log)
        processes.append(second)
        await emulator.wait_for(
            lambda: resumed_result(emulator, alice) and resumed_result(emulator, bob),
            JOB_SECONDS,
            "both resumed results",
        )
        # A new user's job queues behind anything the restart could run again. Once its result is posted
        # and the store holds nothing unfinished or undelivered, a second delivery would be on record.
        carol = emulator.user("carol")
        marker = await emulator.slash(carol, "caption", attachment=(wav_bytes(2.0, seed=5), "c.wav", "audio/wav"))
        await accepted(emulator, marker)
        await emulator.wait_for(lambda: results_for(emulator, carol), JOB_SECONDS, "the later job's captions")
        store = await JobStore.open(Settings(storage_dir=storage))
        try:
            await every_job_settled(store)
        finally:
            await store.close()
        (track,) = results_for(emulator, alice)
        (captions,) = results_for(emulator, bob)
        assert f"`{running_id}`" in track.content and f"`{queued_id}`" in captions.content
        for message, user in ((track, alice), (captions, bob)):
            assert message.via == "channel" and pings(message) == (set(), {str(user.id)})
            assert LINE.search(message.text())
        assert len(track.files) == 1 and track.files[0].filename.startswith(f"mtm-{running_id}")

        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 60) == 0
        output = log.read_text()
        assert TOKEN not in output and "Traceback" not in output, output[-3000:]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await emulator.stop()
