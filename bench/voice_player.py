"""Benchmark: the Play button's latency and the voice player's CPU cost.

    python -m bench.voice_player                 # a 30 s track on a stage of the loopback emulator
    python -m bench.voice_player --seconds 120

Runs the real bot (tiny pipeline, CPU) in this process against the loopback Discord emulator and its
voice server (tests/voice_server.py): one /compose makes a result, its kept WAV is replaced by `--seconds`
of synthetic music, and a user sitting on a stage clicks Play. Prints one JSON object:
- `click_to_first_audio_ms`: from dispatching the click to the first audio packet arriving over UDP: the
  voice handshake (gateway, TLS WebSocket, IP discovery, un-suppressing on the stage) plus resampling the
  track; a loopback lower bound, without Discord's network round trips;
- `player_cpu_s_per_audio_s`: CPU time of discord.py's audio player thread (Opus encoding, packet
  encryption, sending) per second of audio played;
- `resample_cpu_s_per_audio_s`: CPU time of turning the 32 kHz WAV into 48 kHz stereo PCM, once per play,
  per second of audio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from discord_emulator import DiscordEmulator
from synth import music
from test_bot_e2e import connect_bot, disconnect_bot
from test_bot_results import job_id_of, result_of

from mtm_bot.core.audio import Audio, write
from mtm_bot.core.playback import read_track, voice_pcm
from mtm_bot.stages.generator import SAMPLE_RATE

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(native_id: int) -> float | None:
    """user + system CPU time of one thread of this process (Linux), None once it has ended."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


async def player_cpu_seconds(stop: asyncio.Event) -> float:
    """The audio player thread's CPU time, read until it ends (or `stop`)."""
    last = 0.0
    while not stop.is_set():
        player = next((t for t in threading.enumerate() if t.name.startswith("audio-player")), None)
        if player is not None and (seconds := thread_cpu_seconds(player.native_id)) is not None:
            last = seconds
        await asyncio.sleep(0.2)
    return last


async def run(seconds: int) -> dict:
    emulator = await DiscordEmulator().start()
    voice_server = await emulator.start_voice()
    stage = emulator.add_voice_channel("Stage", stage=True)
    with tempfile.TemporaryDirectory() as folder:
        bot = await connect_bot(
            emulator, Path(folder), connector=aiohttp.TCPConnector(limit=0, ssl=voice_server.client_ssl())
        )
        try:
            alice = emulator.user("alice")
            result = await result_of(
                emulator, await emulator.slash(alice, "compose", {"instruction": "a carol", "duration": 10}), alice
            )
            track = Path(folder) / "outputs" / f"{job_id_of(result)}.wav"
            write(Audio(music(seconds, SAMPLE_RATE, seed=5), SAMPLE_RATE), track)
            samples, rate = read_track(track)
            started = time.thread_time()
            voice_pcm(samples, rate)
            resample_cpu = time.thread_time() - started

            await emulator.join_voice(alice, stage)
            click = await emulator.click(alice, result, "Play")
            stop = asyncio.Event()
            cpu = asyncio.create_task(player_cpu_seconds(stop))
            session = await emulator.wait_for(
                lambda: (s := emulator.voice_session(stage)) and s.packets and s, 60, "the first audio packet"
            )
            first_packet = session.packets[0].at
            await emulator.wait_for(
                lambda: emulator.voice_gateway[-1]["channel_id"] is None, seconds + 30, "the bot to leave"
            )
            stop.set()
            player_cpu = await cpu
        finally:
            await disconnect_bot(*bot)
            await emulator.stop()
    return {
        "track_seconds": seconds,
        "mode": session.selected["mode"],
        "packets": len(session.packets),
        "click_to_first_audio_ms": round((first_packet - click.dispatched_at) * 1000, 1),
        "player_cpu_s_per_audio_s": round(player_cpu / seconds, 4),
        "resample_cpu_s_per_audio_s": round(resample_cpu / seconds, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=30, help="length of the track played")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds)), indent=2))


if __name__ == "__main__":
    main()
