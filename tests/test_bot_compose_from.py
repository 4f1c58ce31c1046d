"""“Compose from this” and /compose's instruction suggestions, end to end: the real bot (tiny pipeline)
against the loopback emulator.

The message command works on messages users posted: a voice message as a phone sends it (OGG/Opus at
48 kHz, flag IS_VOICE_MESSAGE, duration_secs and waveform) and a plain audio file. Commands are synced
globally (no MTM_GUILD_ID), as for a bot in many servers, so a second server can ask for suggestions
too. One bot serves the module; tests run in file order and each waits until its jobs have settled.
"""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from discord_emulator import IS_VOICE_MESSAGE, MESSAGE_COMMAND, MODAL, DiscordEmulator, FakeUser, Interaction, snowflake
from synth import music
from test_bot_e2e import (
    JOB_SECONDS,
    LINE,
    accepted,
    ephemeral_error,
    every_job_settled,
    results_for,
    running_bot,
    wav_bytes,
)

from cogs.compose_from import MENU_NAME
from cogs.utils.instruction_suggestions import PRESET_INSTRUCTIONS

pytestmark = pytest.mark.asyncio(loop_scope="module")

OTHER_GUILD = snowflake()
LENGTH = "Length in seconds (optional)"  # the modal's second input
VOICE_RATE = 48000  # what Discord's apps record voice messages at
WAVEFORM_STEP_SECONDS = 0.1  # one amplitude byte per 100 ms, at most 256 bytes, as Discord's apps send


def voice_message(seconds: float, seed: int = 0) -> tuple[bytes, float, bytes]:
    """A voice message's file (OGG/Opus, mono, 48 kHz), its length and its waveform."""
    samples = music(seconds, VOICE_RATE, seed=seed)
    buffer = io.BytesIO()
    sf.write(buffer, samples, VOICE_RATE, format="OGG", subtype="OPUS")
    step = max(round(WAVEFORM_STEP_SECONDS * VOICE_RATE), -(-len(samples) // 256))
    peaks = [np.abs(samples[i : i + step]).max() for i in range(0, len(samples), step)]
    waveform = bytes(round(255 * min(1.0, 2 * peak)) for peak in peaks)
    return buffer.getvalue(), seconds, waveform


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    async with running_bot(tmp_path_factory.mktemp("storage"), guild_commands=False) as world:
        yield world


async def compose_from(
    emulator: DiscordEmulator, user: FakeUser, message, instruction: str, duration: str = ""
) -> Interaction:
    """`user` runs Compose from this on `message` and fills in the modal it opens."""
    menu = await emulator.context_menu(user, message, MENU_NAME)
    return await emulator.submit_modal(user, menu, {"Instruction": instruction, LENGTH: duration})


async def test_the_message_command_is_synced_by_discords_rules(world):
    emulator, _ = world
    (menu,) = [c for c in emulator.commands["global"] if c["type"] == MESSAGE_COMMAND]
    assert menu["name"] == MENU_NAME and "Compose" in menu["name"]
    assert menu["description"] == "" and not menu.get("options")  # the emulator refuses either in a sync
    assert not emulator.refused


async def test_a_voice_message_becomes_a_compose_result(world):
    emulator, bot = world
    phone, listener = emulator.user("phone"), emulator.user("listener")
    ogg, seconds, waveform = voice_message(3.2)
    message = emulator.post_voice_message(phone, ogg, seconds, waveform)
    assert message.flags == IS_VOICE_MESSAGE and not message.content

    # Anyone in the channel may compose from it; the job is theirs.
    menu = await emulator.context_menu(listener, message, MENU_NAME)
    submitted = await emulator.submit_modal(listener, menu, {"Instruction": "a choir carol in a stone church"})
    assert menu.callback_type == MODAL and menu.modal.inputs[0].label == "Instruction" and menu.modal.inputs[0].required
    assert menu.modal.inputs[1].label == LENGTH and not menu.modal.inputs[1].required
    job_id = await accepted(emulator, submitted)

    (result,) = await emulator.wait_for(
        lambda: results_for(emulator, listener), JOB_SECONDS, "the voice message's track"
    )
    assert f"`{job_id}`" in result.content and not result.ephemeral
    assert len(LINE.findall(result.text())) == 1 and "0:00–0:10 " in result.text()
    (track,) = result.files
    audio, rate = sf.read(io.BytesIO(track.data))
    assert abs(len(audio) / rate - 10.0) < 0.05  # 3.2 s rounded up to one whole block

    job = await bot.store.get(job_id)
    assert job.user_id == listener.id and job.instruction == "a choir carol in a stone church"
    assert sf.info(str(job.input_path)).subtype == "OPUS"  # the voice message itself, downloaded from the CDN
    assert message.uploads[0]["id"] in emulator.cdn_downloads
    await every_job_settled(bot.store)


async def test_an_audio_file_on_a_message_becomes_a_compose_result_of_the_length_asked(world):
    emulator, bot = world
    poster, composer = emulator.user("poster"), emulator.user("composer")
    message = emulator.post_message(
        poster, "my hummed idea, thoughts?", attachments=[(wav_bytes(12.0, seed=4), "idea.wav", "audio/x-wav")]
    )
    submitted = await compose_from(emulator, composer, message, "a sea shanty carol sung by pirates", "10 s")
    job_id = await accepted(emulator, submitted)

    (result,) = await emulator.wait_for(lambda: results_for(emulator, composer), JOB_SECONDS, "the file's track")
    assert f"`{job_id}`" in result.content
    assert len(LINE.findall(result.text())) == 1 and "0:00–0:10 " in result.text()
    audio, rate = sf.read(io.BytesIO(result.files[0].data))
    assert abs(len(audio) / rate - 10.0) < 0.05  # 10 s asked, though the clip is 12 s
    await every_job_settled(bot.store)


async def test_a_message_without_audio_is_answered_without_a_modal(world):
    emulator, _ = world
    talker = emulator.user("talker")
    for message in (
        emulator.post_message(talker, "la la la, imagine this with bells"),
        emulator.post_message(talker, "cover art", attachments=[(b"\x89PNG", "cover.png", "image/png")]),
    ):
        menu = await emulator.context_menu(talker, message, MENU_NAME)
        text = await ephemeral_error(emulator, menu)
        assert text.startswith("This message has no audio: ") and "voice message" in text, text
        assert menu.modal is None


async def test_a_bad_length_is_refused_and_nothing_is_queued(world):
    emulator, bot = world
    hasty = emulator.user("hasty")
    ogg, seconds, waveform = voice_message(2.0, seed=1)
    message = emulator.post_voice_message(hasty, ogg, seconds, waveform)
    downloads = len(emulator.cdn_downloads)
    for typed in ("5", str(bot.settings.max_output_seconds + 10), "ten", "12.5"):
        submitted = await compose_from(emulator, hasty, message, "an 8-bit chiptune carol", typed)
        text = await ephemeral_error(emulator, submitted)
        assert f"from 10 to {bot.settings.max_output_seconds}" in text and typed in text, text
        assert not submitted.deferred
    assert not await bot.store.recent_of(hasty.id) and not bot.queue.unfinished_of(hasty.id)
    assert len(emulator.cdn_downloads) == downloads


async def test_the_submission_rate_limit_counts_compose_from_too(world):
    emulator, bot = world
    eager = emulator.user("eager")
    message = emulator.post_message(eager, attachments=[(wav_bytes(2.0), "b.wav", "audio/wav")])
    bot.settings, relaxed = dataclasses.replace(bot.settings, submissions_per_minute=1), bot.settings
    try:
        first = await emulator.slash(eager, "caption", attachment=(b"not audio", "a.txt", "text/plain"))
        await ephemeral_error(emulator, first)  # refused, but it counted as a submission
        text = await ephemeral_error(emulator, await compose_from(emulator, eager, message, "lofi"))
    finally:
        bot.settings = relaxed
    assert "1 per minute" in text and re.search(r"try again in \d+ s", text), text
    assert not await bot.store.recent_of(eager.id)


async def test_suggestions_offer_the_presets_for_an_empty_instruction(world):
    emulator, _ = world
    choices = await emulator.autocomplete(emulator.user("newcomer"), "compose", "instruction", "", guild_id=OTHER_GUILD)
    assert [c["name"] for c in choices] == list(PRESET_INSTRUCTIONS)
    assert all(c["name"] == c["value"] for c in choices)


async def test_suggestions_offer_this_servers_past_instructions_and_never_another_servers(world):
    emulator, _ = world
    here = await emulator.autocomplete(emulator.user("regular"), "compose", "instruction", "")
    # Newest first, then the presets; the choir carol is a preset too, and offered once.
    choir = "a choir carol in a stone church"
    assert [c["name"] for c in here] == [
        "a sea shanty carol sung by pirates",
        choir,
        *(preset for preset in PRESET_INSTRUCTIONS if preset != choir),
    ]
    elsewhere = await emulator.autocomplete(
        emulator.user("stranger"), "compose", "instruction", "", guild_id=OTHER_GUILD
    )
    assert [c["name"] for c in elsewhere] == list(PRESET_INSTRUCTIONS)  # nothing of the first server


async def test_suggestions_follow_what_the_user_types(world):
    emulator, _ = world
    typist = emulator.user("typist")
    shanty = await emulator.autocomplete(typist, "compose", "instruction", "SHANTY  carol")
    assert [c["name"] for c in shanty] == ["a sea shanty carol sung by pirates"]
    assert [c["name"] for c in await emulator.autocomplete(typist, "compose", "instruction", "Carol In")] == [
        "a choir carol in a stone church"
    ]
    jazz = await emulator.autocomplete(typist, "compose", "instruction", "jazz", {"duration": 20})
    assert [c["name"] for c in jazz] == ["a cosy jazz carol with sleigh bells"]
    assert await emulator.autocomplete(typist, "compose", "instruction", "polka") == []
