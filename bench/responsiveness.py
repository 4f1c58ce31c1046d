"""Benchmark: does the bot stay responsive while a job computes? Event-loop stalls and acknowledgement latency.

    python -m bench.responsiveness                      # tiny models on the CPU, a 30 s /compose
    python -m bench.responsiveness --device cuda --duration 60

Runs the real bot (discord.py client, cogs, worker, pipeline) in this process against the loopback
Discord emulator of the test suite. One user's /compose runs while another user sends /queue every
`--probe-every` seconds. Prints one JSON object:
- `loop_stall_ms`: how late a 10 ms timer on the bot's event loop fired while the job computed
  (max, p99, median); a loop blocked by model work shows the length of that work here;
- `ack_ms`: from dispatching an interaction to the emulator receiving its callback, for the /compose
  (on an idle bot) and for the /queue probes (while the job computes). Discord drops interactions not
  acknowledged within 3 000 ms. The emulator runs on the same loop as the bot, so a stall delays both.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from discord_emulator import DiscordEmulator, FakeUser, Interaction
from synth import music

from bot import MTMBot, point_discord_at
from mtm_bot.core.settings import Settings

TIMER_SECONDS = 0.01


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, music(seconds, rate), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def record_loop_lateness(lateness: list[float]) -> None:
    """Append, every 10 ms, how much later than asked the event loop woke this task."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + TIMER_SECONDS
        await asyncio.sleep(TIMER_SECONDS)
        lateness.append(loop.time() - asked)


def has_result(emulator: DiscordEmulator, user: FakeUser) -> bool:
    return any(
        m.via in ("followup", "channel") and m.content.startswith(user.mention) and "job `" in m.content
        for m in emulator.messages
    )


def summary_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered) * 1000, 1),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


async def measure(args: argparse.Namespace, storage: Path) -> dict:
    emulator = await DiscordEmulator().start()
    env = {
        **emulator.env(),
        "MTM_PROFILE": args.profile,
        "MTM_DEVICE": args.device,
        "MTM_STORAGE_DIR": str(storage),
        "MTM_SEED": "1",
    }
    settings = Settings.from_env(env, env_file=None)
    point_discord_at(settings)
    bot = MTMBot(settings)
    runner = asyncio.create_task(bot.start(settings.discord_token))
    try:
        await emulator.wait_for(lambda: runner.done() or (emulator.connected and emulator.commands), 600, "bot start")
        if runner.done():
            runner.result()  # raises the start-up error
        composer, prober = emulator.user("composer"), emulator.user("prober")
        compose = await emulator.slash(
            composer,
            "compose",
            {"instruction": "a cosy jazz carol", "duration": args.duration},
            attachment=(wav_bytes(args.clip_seconds), "clip.wav", "audio/wav"),
        )
        await emulator.wait_for(lambda: bot.queue.running or has_result(emulator, composer), 120, "the job to start")
        lateness: list[float] = []
        watcher = asyncio.create_task(record_loop_lateness(lateness))
        started = time.perf_counter()
        probes: list[Interaction] = []
        while not has_result(emulator, composer):
            probes.append(await emulator.slash(prober, "queue"))
            await asyncio.sleep(args.probe_every)
        job_s = time.perf_counter() - started
        watcher.cancel()
        await emulator.wait_for(
            lambda: all(p.callback_at is not None or p.callback_errors for p in probes), 30, "every probe's callback"
        )
    finally:
        await bot.close()
        await asyncio.wait_for(runner, 60)
        await emulator.stop()
    late = [p for p in probes if p.callback_errors]
    return {
        "profile": args.profile,
        "device": args.device,
        "output_s": args.duration,
        "job_s_after_start": round(job_s, 2),
        "loop_stall_ms": summary_ms(lateness),
        "ack_ms": {
            "compose_idle": round(compose.ack_seconds * 1000, 1) if compose.ack_seconds is not None else None,
            "queue_during_job": summary_ms([p.ack_seconds for p in probes if p.ack_seconds is not None]),
        },
        "probes_refused_past_3s": len(late),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--duration", type=int, default=30, help="seconds of output the /compose asks for")
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--probe-every", type=float, default=0.25, help="seconds between /queue probes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtm-bench-") as storage:
        print(json.dumps(asyncio.run(measure(args, Path(storage))), indent=2))


if __name__ == "__main__":
    main()
