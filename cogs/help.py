"""/help: what the bot does and how to use it (ephemeral)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

if TYPE_CHECKING:
    from bot import MTMBot


def help_text(max_output_seconds: int, max_clip_seconds: float, max_upload_mb: float) -> str:
    return (
        "**MTM Bot: Music → Text → Music**\n"
        "`/compose instruction [audio] [image] [duration]`: I caption your clip in 10 s segments, rewrite the "
        "captions with your instruction, and generate a new track from them, following the clip's melody.\n"
        "• `instruction`: your taste, e.g. *a cosy jazz carol with sleigh bells*\n"
        f"• `audio` (optional): a clip of 1–{max_clip_seconds:g} s (WAV, FLAC, OGG, MP3, …), at most "
        f"{max_upload_mb:g} MB; without one, the track comes from your words alone\n"
        "• `image` (optional): a picture (PNG, JPEG, WebP, GIF) for the track to evoke\n"
        f"• `duration`: 10–{max_output_seconds} s (default: the clip's length rounded up to 10 s, 30 s without a clip)\n"
        "On any message with audio (a voice message recorded on your phone, an audio file): Apps → "
        "**Compose from this** asks for your instruction and composes from that audio like `/compose`.\n"
        "Under every track: **Reroll** (another take), **Extend** (10–60 s more), **Remix** (the same clip, "
        "a new instruction), **Redo from…** (keep the start, make the rest again), **MIDI** (the notes, "
        "sent to you) and **Play** (in the voice or stage channel you are in; **Stop** ends it). Anyone here "
        "can build on a track while it is kept.\n"
        "`/caption audio`: only the captions of your clip.\n"
        "`/library query` or `/library image`: this server's past tracks closest to your words or picture.\n"
        "`/queue`: what is running, what plays in voice, and where your jobs are.\n"
        "`/cancel [job]`: stop your newest job, or the one with that id.\n"
        "Jobs are served in turn, a few at once, fairly across users; you are pinged when your track is ready. "
        "The models (LP-MusicCaps, MusicGen) are licensed for non-commercial use only."
    )


class Help(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot

    @app_commands.command(name="help", description="How to use MTM Bot")
    async def help(self, interaction: discord.Interaction) -> None:
        s = self.bot.settings
        await interaction.response.send_message(
            help_text(s.max_output_seconds, s.max_clip_seconds, s.max_upload_mb), ephemeral=True
        )


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Help(bot))
