"""/caption: only the captions of a clip, one line per 10 s segment (queued like /compose)."""
from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.job import JobKind

from .submit import accept, submission_rate_limit


class Caption(commands.Cog):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot

    @app_commands.command(name="caption", description="Describe a music clip in 10 s segments")
    @app_commands.describe(audio="A music clip (WAV, FLAC, OGG, MP3)")
    @submission_rate_limit
    async def caption(self, interaction: discord.Interaction, audio: discord.Attachment) -> None:
        await accept(interaction, audio, JobKind.CAPTION)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Caption(bot))
