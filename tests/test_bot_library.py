"""/library end to end: the real bot (tiny pipeline, the real packaged embedder) against the loopback emulator.

The commands are synced globally (no MTM_GUILD_ID), as for a bot in many servers, so a second server
can ask too. One bot serves the module; tests run in file order.
"""

from __future__ import annotations

import pytest
import pytest_asyncio
from discord_emulator import DiscordEmulator, Interaction, snowflake
from test_bot_e2e import (
    JOB_SECONDS,
    accepted,
    ephemeral_error,
    every_job_settled,
    pings,
    results_for,
    running_bot,
    wav_bytes,
)

from cogs.utils.render import EMPTY_LIBRARY
from tests.pictures import picture_bytes

pytestmark = pytest.mark.asyncio(loop_scope="module")

OTHER_GUILD = snowflake()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    async with running_bot(tmp_path_factory.mktemp("storage"), guild_commands=False) as world:
        yield world


async def library_reply(emulator: DiscordEmulator, interaction: Interaction) -> str:
    """The private answer to /library: the deferred reply, filled in."""
    await emulator.wait_for(lambda: interaction.response and not interaction.response.thinking, 60, "/library reply")
    assert not interaction.callback_errors, interaction.callback_errors
    assert interaction.response.ephemeral and not interaction.followups
    assert pings(interaction.response) == (set(), set())
    return interaction.response.content


async def test_an_empty_library_says_so(world):
    emulator, _ = world
    interaction = await emulator.slash(emulator.user("early"), "library", {"query": "anything festive"})
    assert await library_reply(emulator, interaction) == EMPTY_LIBRARY


async def test_a_delivered_track_is_found_in_its_server_and_never_in_another(world):
    emulator, bot = world
    holly = emulator.user("holly")
    compose = await emulator.slash(
        holly,
        "compose",
        {"instruction": "a festive brass carol with sleigh bells", "duration": 10},
        attachment=(wav_bytes(3.0), "carol.wav", "audio/wav"),
    )
    await accepted(emulator, compose)
    (result,) = await emulator.wait_for(lambda: results_for(emulator, holly), JOB_SECONDS, "the carol")
    await every_job_settled(bot.store)  # delivered, so indexed

    here = await emulator.slash(emulator.user("finder"), "library", {"query": "sleigh bells and brass, festive"})
    text = await library_reply(emulator, here)
    assert f"https://discord.com/channels/{emulator.guild_id}/{emulator.channel_id}/{result.id})" in text
    assert "festive brass carol with sleigh bells" in text and "similarity 0." in text

    elsewhere = await emulator.slash(
        emulator.user("stranger"), "library", {"query": "sleigh bells and brass, festive"}, guild_id=OTHER_GUILD
    )
    assert await library_reply(emulator, elsewhere) == EMPTY_LIBRARY


async def picture_search(emulator: DiscordEmulator, guild_id: int | None = None) -> str:
    """/library image: a private status with the job id while the picture waits for the GPU queue, then
    the private matches."""
    interaction = await emulator.slash(
        emulator.user("painter"),
        "library",
        guild_id=guild_id,
        attachments={"image": (picture_bytes(), "snowy-village.png", "image/png")},
    )
    await emulator.wait_for(lambda: interaction.followups, JOB_SECONDS, "the picture's matches")
    assert not interaction.callback_errors, interaction.callback_errors
    assert interaction.response.ephemeral and "job `" in interaction.response.content
    (matches,) = interaction.followups
    assert matches.ephemeral and pings(matches) == (set(), set())
    return matches.content


async def test_a_picture_finds_this_servers_tracks_through_the_queue(world):
    emulator, bot = world
    (carol,) = [m for m in emulator.messages if "your track is ready" in m.content]
    text = await picture_search(emulator)
    assert "your picture, as I see it:" in text  # the tiny captioner's words: noise, but words
    assert f"https://discord.com/channels/{emulator.guild_id}/{emulator.channel_id}/{carol.id})" in text
    assert await picture_search(emulator, guild_id=OTHER_GUILD) == EMPTY_LIBRARY
    await every_job_settled(bot.store)


async def test_a_library_search_without_words_is_refused(world):
    emulator, _ = world
    interaction = await emulator.slash(emulator.user("blank"), "library", {})
    assert "what to look for" in await ephemeral_error(emulator, interaction)
