"""Play and Stop, end to end: the real bot joins a stage or voice channel of the loopback emulator, and the
loopback voice server (tests/voice_server.py) decrypts and decodes, with libopus, the audio it sends.

One bot and one 10 s track serve the module. The kept WAV is replaced by a tune of random notes: the tiny
models make noise, whose waveform Opus is free to reshape, and tunes of different seeds are uncorrelated
(unlike tests/synth.py's music, whose bass and drums are the same for every seed), so the comparison
of what arrives with the track can fail.
"""

from __future__ import annotations

import asyncio

import aiohttp
import discord
import numpy as np
import pytest
import pytest_asyncio
import soxr
from discord_emulator import CONNECT, MUTE_MEMBERS, SPEAK, DiscordEmulator, Interaction, Message
from test_bot_e2e import connect_bot, disconnect_bot, ephemeral_error
from test_bot_results import job_id_of, result_of
from voice_server import MLS_KEY_PACKAGE, SPOKEN_MODE, VoiceSession

from mtm_bot.core.audio import Audio, write
from mtm_bot.core.playback import read_track
from mtm_bot.stages.generator import SAMPLE_RATE

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRACK_SECONDS = 10
OPUS_SILENCE = b"\xf8\xff\xfe"  # the frames discord.py sends after a track
SPEAKING_VOICE = 1


def tune(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Eighth-second sine notes drawn from three octaves above A3."""
    rng = np.random.default_rng(seed)
    n, note = int(seconds * rate), rate // 8
    pitches = np.repeat(220.0 * 2.0 ** (rng.integers(0, 36, -(-n // note)) / 12), note)[:n]
    return (0.4 * np.sin(2 * np.pi * np.cumsum(pitches) / rate)).astype(np.float32)


class Channels:
    def __init__(self, emulator: DiscordEmulator) -> None:
        self.stage = emulator.add_voice_channel("Stage", stage=True)
        self.voice = emulator.add_voice_channel("Lounge")
        self.mute = emulator.add_voice_channel("No speaking", deny_bot=SPEAK)
        self.closed = emulator.add_voice_channel("Closed", deny_bot=CONNECT | SPEAK)
        self.listeners_only = emulator.add_voice_channel("Audience", stage=True, deny_bot=MUTE_MEMBERS)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    emulator = await DiscordEmulator().start()
    voice_server = await emulator.start_voice()
    channels = Channels(emulator)
    connector = aiohttp.TCPConnector(limit=0, ssl=voice_server.client_ssl())
    storage = tmp_path_factory.mktemp("storage")
    bot = await connect_bot(emulator, storage, connector=connector)
    yield emulator, channels, storage
    await disconnect_bot(*bot)
    await emulator.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def original(world):
    """Alice's 10 s track, its kept WAV replaced by a tune."""
    emulator, _, storage = world
    alice = emulator.user("alice")
    result = await result_of(
        emulator, await emulator.slash(alice, "compose", {"instruction": "a carol", "duration": TRACK_SECONDS}), alice
    )
    write(
        Audio(tune(TRACK_SECONDS, SAMPLE_RATE, seed=5), SAMPLE_RATE), storage / "outputs" / f"{job_id_of(result)}.wav"
    )
    return result


async def answer(emulator: DiscordEmulator, interaction: Interaction) -> str:
    """The ephemeral answer to a Play or Stop click."""
    message = await emulator.wait_for(
        lambda: next((m for m in interaction.visible_messages() if m.content and not m.thinking), None),
        60,
        "the answer",
    )
    assert message.ephemeral and not interaction.callback_errors, (message.content, interaction.callback_errors)
    return message.content


def now_playing(emulator: DiscordEmulator, job_id: str, after: int = 0) -> Message | None:
    return next(
        (m for m in emulator.messages[after:] if m.via == "channel" and f"Now playing `{job_id}`" in m.content), None
    )


def split_tracks(session: VoiceSession) -> list[list[bytes]]:
    """The Opus frames the bot sent, one list per track played (each ends with discord.py's silence frames)."""
    tracks, current = [], []
    for packet in sorted(session.packets, key=lambda p: p.sequence):
        if packet.opus == OPUS_SILENCE:
            if current:
                tracks.append(current)
            current = []
        else:
            current.append(packet.opus)
    return tracks + ([current] if current else [])


def decoded_mono(frames: list[bytes]) -> np.ndarray:
    """libopus's decoding of the frames, as discord.py's own Decoder does it: 48 kHz stereo, mixed to mono."""
    decoder = discord.opus.Decoder()
    pcm = b"".join(decoder.decode(frame, fec=False) for frame in frames)
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, 2).astype(np.float32).mean(axis=1) / 32768.0


def best_correlation(played: np.ndarray, track: np.ndarray, most_lag: int = 2000) -> float:
    """Pearson correlation of the played audio with the track, at the lag (Opus's delay) that fits best."""
    n = len(track) - most_lag
    return max(float(np.corrcoef(played[lag : lag + n], track[:n])[0, 1]) for lag in range(0, most_lag, 4))


async def test_a_clicker_in_no_voice_channel_is_told_to_join_one(world, original):
    emulator, _, _ = world
    text = await ephemeral_error(emulator, await emulator.click(emulator.user("bob"), original, "Play"))
    assert "Join a voice or stage channel first" in text
    assert not emulator.voice_gateway  # the bot went nowhere


@pytest.mark.parametrize(
    "channel, refusal",
    [
        ("closed", "I need the Connect and Speak permissions there"),
        ("mute", "I need the Speak permission there"),
        ("listeners_only", "I cannot become a speaker on the stage"),
    ],
)
async def test_a_channel_the_bot_cannot_be_heard_in_is_refused(world, original, channel, refusal):
    emulator, channels, _ = world
    carol = emulator.user("carol")
    await emulator.join_voice(carol, getattr(channels, channel))
    text = await ephemeral_error(emulator, await emulator.click(carol, original, "Play"))
    assert refusal in text and f"<#{getattr(channels, channel)}>" in text
    assert not emulator.voice_gateway


async def test_play_on_a_stage_queue_stop_and_leave(world, original):
    emulator, channels, storage = world
    job_id = job_id_of(original)
    alice, bob, carol = emulator.user("alice"), emulator.user("bob"), emulator.user("carol")
    for user in (alice, bob, carol):
        await emulator.join_voice(user, channels.stage)
    before = len(emulator.messages)
    clicked = await emulator.click(alice, original, "Play")
    assert f"Playing `{job_id}` in <#{channels.stage}> now" in await answer(emulator, clicked)
    assert emulator.voice_gateway[-1]["channel_id"] == channels.stage and emulator.voice_gateway[-1]["self_deaf"]
    assert emulator.voice_state_patches == [
        {"suppress": False, "channel_id": channels.stage, "request_to_speak_timestamp": None}
    ]
    session = emulator.voice_session(channels.stage)
    assert session.selected["mode"] == SPOKEN_MODE and session.dave_protocol_version == 0  # stages are exempt
    assert session.identify["max_dave_protocol_version"] >= 1
    first = await emulator.wait_for(lambda: now_playing(emulator, job_id, before), 10, "now playing")

    queued = await emulator.click(bob, original, "Play")  # while the first plays: queued, its place said
    assert f"Queued `{job_id}` in <#{channels.stage}>: number 1 in line" in await answer(emulator, queued)
    listing = await emulator.slash(bob, "queue")
    shown = await answer(emulator, listing)
    assert f"**Playing in <#{channels.stage}>:** `{job_id}` (0:10) for {alice.mention}" in shown
    assert f"1. `{job_id}` (0:10) for {bob.mention}" in shown
    refused = await emulator.click(carol, first, "Stop")
    assert f"Only {alice.mention}, who started this track, or a server manager can stop it" in await answer(
        emulator, refused
    )

    second = await emulator.wait_for(
        lambda: now_playing(emulator, job_id, emulator.messages.index(first) + 1),
        TRACK_SECONDS + 10,
        "the queued track to start",
    )
    assert "Played" in first.content and not first.components  # the first ended by itself
    packets_then = len(session.packets)
    await asyncio.sleep(1.0)
    stopped = await emulator.click(bob, second, "Stop")
    assert f"Stopped `{job_id}`" in await answer(emulator, stopped)
    await emulator.wait_for(lambda: emulator.voice_gateway[-1]["channel_id"] is None, 10, "the bot to leave")
    assert "Stopped" in second.content
    assert len(session.packets) > packets_then

    played, cut = split_tracks(session)
    assert not session.undecryptable
    assert len(played) * 0.020 == pytest.approx(TRACK_SECONDS, abs=0.02)  # the whole track, no more
    assert 0.5 < len(cut) * 0.020 < 3.0  # Stop ended the second within a moment
    samples, rate = read_track(storage / "outputs" / f"{job_id}.wav")
    track = soxr.resample(samples.astype(np.float32) / 32768.0, rate, 48000)
    assert best_correlation(decoded_mono(played), track) > 0.9
    assert (
        best_correlation(decoded_mono(played), soxr.resample(tune(TRACK_SECONDS, SAMPLE_RATE, seed=6), rate, 48000))
        < 0.3
    )  # another tune is told apart
    speaking = [flags for _, flags in session.speaking]
    assert speaking[0] == 0 and speaking.count(SPEAKING_VOICE) == 2 and speaking[-1] == 0  # SPEAKING on, off, per track
    await asyncio.sleep(0.5)
    assert len(split_tracks(session)) == 2  # nothing after the bot left
    assert session.closed and not emulator.voice_states.get(emulator.bot_user.id)


async def test_a_voice_channel_offers_dave_and_a_manager_may_stop_anyone(world, original):
    emulator, channels, _ = world
    job_id = job_id_of(original)
    dave, manager = emulator.user("dave"), emulator.user("mod", manage_guild=True)
    await emulator.join_voice(dave, channels.voice)
    joins = len(emulator.voice_gateway)
    before = len(emulator.messages)
    assert "now" in await answer(emulator, await emulator.click(dave, original, "Play"))
    session = emulator.voice_session(channels.voice)
    assert session.identify["max_dave_protocol_version"] == 1 and session.dave_protocol_version == 1
    # With DAVE on, discord.py starts its MLS group member: it sends its key package (binary opcode 26).
    key_packages = [payload for op, payload in session.binary if op == MLS_KEY_PACKAGE]
    assert len(key_packages) == 1 and len(key_packages[0]) > 100
    assert len(emulator.voice_state_patches) == 1  # no un-suppressing outside a stage
    playing = await emulator.wait_for(lambda: now_playing(emulator, job_id, before), 10, "now playing")
    await emulator.wait_for(lambda: len(session.packets) > 10, 10, "audio")
    assert f"Stopped `{job_id}`" in await answer(emulator, await emulator.click(manager, playing, "Stop"))
    await emulator.wait_for(
        lambda: len(emulator.voice_gateway) == joins + 2 and emulator.voice_gateway[-1]["channel_id"] is None,
        10,
        "the bot to leave",
    )
    assert playing.content.startswith("⏹️ Stopped") and not playing.components
