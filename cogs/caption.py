"""/caption: only the captions of a clip, one line per 10 s segment (queued like /compose)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.jobs.job import JobKind

from .utils.submit import accept, submission_rate_limit

if TYPE_CHECKING:
    from bot import MTMBot


class Caption(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot

    @app_commands.command(name="caption", description="Describe a music clip in 10 s segments")
    @app_commands.describe(audio="A music clip (WAV, FLAC, OGG, MP3)")
    @submission_rate_limit
    async def caption(self, interaction: discord.Interaction, audio: discord.Attachment) -> None:
        await accept(interaction, audio, JobKind.CAPTION)


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Caption(bot))
