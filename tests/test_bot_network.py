"""`python bot.py` when Discord cannot be reached: one sentence per try, retries with backoff, no traceback,
and a normal start once Discord answers."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path

from discord_emulator import DiscordEmulator
from test_bot_restart import BOT, TOKEN, bot_env

UNAVAILABLE = "Cannot reach Discord at {api} ("


def free_port() -> int:
    """A port nothing listens on (until someone binds it again): connecting there is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def start(env: dict[str, str], cwd: Path, log: Path) -> asyncio.subprocess.Process:
    with open(log, "wb") as out:
        return await asyncio.create_subprocess_exec(*BOT, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_for_lines(
    process: asyncio.subprocess.Process, log: Path, text: str, count: int, timeout: float
) -> list[str]:
    def lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if text in line]

    await wait_until(process, log, lambda: len(lines()) >= count, timeout, f"{count} x {text!r}")
    return lines()


async def wait_until(process: asyncio.subprocess.Process, log: Path, done, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert process.returncode is None, f"the bot exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not within {timeout} s:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.2)


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), 60)
    except TimeoutError:
        process.kill()
        raise AssertionError("the bot did not stop within 60 s of SIGTERM") from None


async def test_an_unresolvable_discord_is_one_sentence_per_try_and_retried(tmp_path):
    api = "http://discord.invalid/api/v10"  # .invalid never resolves (RFC 2606)
    env = bot_env(
        DISCORD_TOKEN=TOKEN,
        DISCORD_API_BASE=api,
        MTM_PROFILE="tiny",
        MTM_DEVICE="cpu",
        MTM_STORAGE_DIR=str(tmp_path / "storage"),
    )
    log = tmp_path / "bot.log"
    process = await start(env, tmp_path, log)
    try:
        lines = await wait_for_lines(process, log, UNAVAILABLE.format(api=api), 2, 120)
    finally:
        code = await stop(process)
    assert "retrying in 5 s" in lines[0] and "retrying in 10 s" in lines[1]  # backoff
    text = log.read_text()
    assert "Traceback" not in text and TOKEN not in text
    assert code == 0


async def test_a_refused_connection_is_retried_until_discord_answers(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v10"
    emulator = DiscordEmulator()
    env = bot_env(
        DISCORD_TOKEN=TOKEN,
        DISCORD_API_BASE=api,
        DISCORD_GATEWAY_URL=f"ws://127.0.0.1:{port}/gateway",
        MTM_GUILD_ID=str(emulator.guild_id),
        MTM_PROFILE="tiny",
        MTM_DEVICE="cpu",
        MTM_STORAGE_DIR=str(tmp_path / "storage"),
    )
    log = tmp_path / "bot.log"
    process = await start(env, tmp_path, log)
    try:
        lines = await wait_for_lines(process, log, UNAVAILABLE.format(api=api), 2, 120)
        assert all("(Connection refused)" in line for line in lines), lines
        await emulator.start(port)  # Discord comes back: the next try (10 s later) logs in and connects
        await wait_until(process, log, lambda: emulator.identifies and emulator.commands, 300, "connecting")
        assert emulator.token == TOKEN
    finally:
        code = await stop(process)
        await emulator.stop()
    text = log.read_text()
    assert "Traceback" not in text and TOKEN not in text
    assert text.count("loading the tiny models") == 1
    assert code == 0
