"""/library: this server's past tracks closest to words or to a picture (ephemeral replies).

Words are embedded right here (the embedder lives in the bot process, on the CPU). A picture must first
be described by the image captioner, a GPU model: it goes through the job queue like any GPU work, and
the delivery of that job runs the search (cogs.utils.delivery).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.core.errors import InputError
from mtm_bot.jobs.job import JobKind
from mtm_bot.jobs.library import MAX_QUERY_CHARS

from .utils.render import RESULTS_SHOWN, library_reply, quote, shorten
from .utils.submit import accept

if TYPE_CHECKING:
    from bot import MTMBot


class ServerLibrary(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot

    @app_commands.command(
        name="library", description="Find this server's past tracks closest to your words or a picture"
    )
    @app_commands.describe(
        query="What you are looking for, e.g. 'festive brass with sleigh bells'",
        image="A picture (PNG, JPEG, WebP, GIF): tracks that would suit it",
    )
    @app_commands.guild_only()
    async def library(
        self,
        interaction: discord.Interaction,
        query: app_commands.Range[str, 1, MAX_QUERY_CHARS] | None = None,
        image: discord.Attachment | None = None,
    ) -> None:
        if image is not None and query is not None:
            raise InputError("Search with words or with a picture, not both at once.")
        if image is not None:
            await accept(interaction, None, JobKind.LIBRARY_IMAGE, image=image)
            return
        # Embedding the query takes a moment on a busy CPU: defer, privately, within Discord's 3 s.
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert self.bot.library is not None and interaction.guild_id is not None  # set up in setup_hook; guild_only
        matches = await self.bot.library.search(interaction.guild_id, query or "", limit=RESULTS_SHOWN)
        await interaction.followup.send(
            library_reply(quote(shorten(query or "", 100)), matches),
            ephemeral=True,
            allowed_mentions=discord.AllowedMentions.none(),
        )


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(ServerLibrary(bot))
