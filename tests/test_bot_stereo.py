"""The whole bot with a stereo MusicGen checkpoint (MTM_MUSICGEN_ID), tiny profile, through the emulator:
tracks come in two channels and fit the upload limit; what is built on them stays stereo."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from discord_emulator import DiscordEmulator
from test_bot_e2e import connect_bot, disconnect_bot, wav_bytes
from test_bot_results import caption_lines, result_of


def channels_of(message) -> np.ndarray:
    (track,) = message.files
    samples, rate = sf.read(io.BytesIO(track.data), dtype="float32")
    assert rate == 32000
    return samples


async def test_a_stereo_server_delivers_two_channels_that_fit_the_upload_limit(tmp_path):
    emulator = await DiscordEmulator().start()
    bot = await connect_bot(emulator, tmp_path / "storage", MTM_MUSICGEN_ID="facebook/musicgen-stereo-melody")
    try:
        alice, bob = emulator.user("alice"), emulator.user("bob")
        limit = 1_000_000  # a 20 s stereo WAV is 2.56 MB: it must come compressed
        original = await result_of(
            emulator,
            await emulator.slash(
                alice,
                "compose",
                {"instruction": "a cosy jazz carol", "duration": 20},
                attachment=(wav_bytes(14.0), "hum.wav", "audio/wav"),
                attachment_size_limit=limit,
            ),
            alice,
        )
        samples = channels_of(original)
        assert samples.shape == (20 * 32000, 2) and not np.allclose(samples[:, 0], samples[:, 1])
        assert len(original.files[0].data) <= limit and not original.files[0].filename.endswith(".wav")
        reroll = await result_of(emulator, await emulator.click(bob, original, "Reroll"), bob)
        assert channels_of(reroll).shape == (20 * 32000, 2) and caption_lines(reroll) == caption_lines(original)
    finally:
        await disconnect_bot(*bot)
        await emulator.stop()
