"""Play and Stop: a kept track played to the clicker's voice or stage channel, one queue per server.

The Play button sits under every track (cogs.results); a click is refused like the other buttons'
(the per-user submission rate) and, ephemerally, when the clicker is in no voice or stage channel or the
bot cannot be heard there (cogs.voice). Each track that starts gets a public "now playing" message in
the channel where Play was clicked, with a Stop button for whoever clicked Play and for server managers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import discord
from discord.ext import commands

from mtm_bot.core.playback import Play, read_track
from mtm_bot.core.timecode import format_time

from .results import JOB_ID, _JobButton
from .utils.client import mtm_bot
from .utils.errors import answer_error
from .utils.submit import check_submission_rate
from .utils.voice import CannotPlay, GuildPlayer

if TYPE_CHECKING:
    from bot import MTMBot

log = logging.getLogger(__name__)


class StopButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:stop:{JOB_ID}"):
    action, label, emoji = "stop", "Stop", "⏹️"

    async def callback(self, interaction: discord.Interaction) -> None:
        await cast("Player", mtm_bot(interaction).get_cog("Player")).stop(interaction, self.job_id)


def stop_controls(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton(job_id))
    return view


def listening_channel(interaction: discord.Interaction) -> discord.VoiceChannel | discord.StageChannel:
    """The voice or stage channel the clicker sits in (from the server's voice states)."""
    voice = interaction.user.voice if isinstance(interaction.user, discord.Member) else None
    if voice is None or voice.channel is None:
        raise CannotPlay("Join a voice or stage channel first, then click Play: I play the track to you there.")
    return voice.channel


class Player(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot
        self.players: dict[int, GuildPlayer] = {}  # guild id -> its player

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(StopButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(StopButton)
        for player in self.players.values():
            await player.close()

    def player_of(self, guild: discord.Guild) -> GuildPlayer:
        if guild.id not in self.players:
            self.players[guild.id] = GuildPlayer(guild, self.bot.settings.max_jobs_per_user, self.announce)
        return self.players[guild.id]

    async def play(self, interaction: discord.Interaction, job_id: str) -> None:
        """A Play click: queue the kept track of `job_id` in the clicker's channel; the answer is for the
        clicker alone (the "now playing" message is public)."""
        try:
            check_submission_rate(interaction)
            channel = listening_channel(interaction)
            assert self.bot.store is not None and interaction.channel_id is not None  # set up; a click's channel
            job = await self.bot.store.parent_for(job_id)  # refuses an expired result
            await interaction.response.defer(ephemeral=True, thinking=True)  # joining takes a moment
            samples, rate = await asyncio.to_thread(read_track, self.bot.store.output_path(job.id))
            play = Play(job.id, interaction.user.id, interaction.channel_id, samples, rate)
            position = await self.player_of(channel.guild).enqueue(play, channel)  # the clicker's server
        except Exception as error:
            await answer_error(interaction, error)
            return
        text = (
            f"Playing `{job_id}` in {channel.mention} now."
            if position == 0
            else f"Queued `{job_id}` in {channel.mention}: number {position} in line."
        )
        await interaction.followup.send(text, ephemeral=True)

    async def stop(self, interaction: discord.Interaction, job_id: str) -> None:
        player = None if interaction.guild_id is None else self.players.get(interaction.guild_id)
        now = None if player is None else player.queue.now
        if player is None or now is None or now.job_id != job_id:
            text = "That track is not playing any more."
        elif interaction.user.id != now.requester_id and not interaction.permissions.manage_guild:
            text = f"Only <@{now.requester_id}>, who started this track, or a server manager can stop it."
        else:
            player.stop()
            text = f"Stopped `{job_id}`."
        await interaction.response.send_message(text, ephemeral=True)

    async def announce(self, play: Play, channel: discord.abc.GuildChannel) -> Callable[[bool], Awaitable[None]]:
        """Post "now playing" with a Stop button; what it returns turns the post into "played" or "stopped"."""
        what = f"`{play.job_id}` ({format_time(play.seconds)}) in {channel.mention}, for <@{play.requester_id}>"
        try:
            message = await self.bot.get_partial_messageable(play.text_channel_id).send(
                f"▶️ Now playing {what}", view=stop_controls(play.job_id)
            )
        except discord.HTTPException:  # the track plays all the same; there is just no Stop button
            log.warning("could not post 'now playing' in channel %s", play.text_channel_id, exc_info=True)
            message = None

        async def finished(stopped: bool) -> None:
            if message is not None:
                with contextlib.suppress(discord.HTTPException):
                    await message.edit(content=f"{'⏹️ Stopped' if stopped else '✅ Played'} {what}", view=None)

        return finished

    def queue_lines(self, guild_id: int | None) -> list[str]:
        """/queue's lines for this server's voice player: what plays and what waits (none while idle)."""
        player = None if guild_id is None else self.players.get(guild_id)
        if player is None or player.queue.now is None:
            return []
        now = player.queue.now
        assert player.channel is not None  # a track plays: the player is connected
        lines = [
            f"**Playing in {player.channel.mention}:** `{now.job_id}` ({format_time(now.seconds)}) "
            f"for <@{now.requester_id}>"
        ]
        lines += [
            f"{n}. `{play.job_id}` ({format_time(play.seconds)}) for <@{play.requester_id}>"
            for n, play in enumerate(player.queue.waiting, 1)
        ]
        return lines


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Player(bot))
