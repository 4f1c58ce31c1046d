"""/compose: a clip, a picture, or only words, plus an instruction in; a new track out (queued; the result
is posted publicly)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.core.instruction import MAX_INSTRUCTION_CHARS
from mtm_bot.core.settings import MAX_TAKES
from mtm_bot.jobs.job import JobKind
from mtm_bot.stages.pipeline import BLOCK_SECONDS, SECONDS_WITHOUT_CLIP

from .utils.instruction_suggestions import instruction_choices
from .utils.submit import accept, submission_rate_limit

if TYPE_CHECKING:
    from bot import MTMBot


class Compose(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot
        # Register duration's upper bound from the settings so Discord itself enforces it. The
        # command object is this cog's own copy; its parameter is replaced, not mutated.
        params = self.compose._params
        params["duration"] = dataclasses.replace(params["duration"], max_value=bot.settings.max_output_seconds)

    @app_commands.command(name="compose", description="Turn a clip, a picture or just your words into a new track")
    @app_commands.describe(
        instruction="Your taste, e.g. 'a cosy jazz carol with sleigh bells'",
        audio="A music clip (WAV, FLAC, OGG, MP3) whose melody the track follows; without one, words alone",
        image="A picture (PNG, JPEG, WebP, GIF) for the track to evoke",
        duration=(
            "Length of the new track in seconds (default: the clip's length rounded up to 10 s, "
            f"{SECONDS_WITHOUT_CLIP} s without a clip)"
        ),
        takes="How many versions to make from the same captions (1-4), each its own result (default: the server's)",
    )
    @submission_rate_limit
    async def compose(
        self,
        interaction: discord.Interaction,
        instruction: app_commands.Range[str, 1, MAX_INSTRUCTION_CHARS],
        audio: discord.Attachment | None = None,
        image: discord.Attachment | None = None,
        duration: app_commands.Range[int, BLOCK_SECONDS, None] | None = None,
        takes: app_commands.Range[int, 1, MAX_TAKES] | None = None,
    ) -> None:
        await accept(
            interaction,
            audio,
            JobKind.COMPOSE,
            instruction=instruction.strip(),
            duration=duration,
            image=image,
            takes=takes or self.bot.settings.takes,
        )

    @compose.autocomplete("instruction")
    async def suggest_instructions(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        return await instruction_choices(interaction, typed)


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Compose(bot))
