"""One server's voice player: joins the clicker's voice or stage channel for the first track, plays the
queue in order, and leaves once it is empty.

discord.py does the voice protocol (the voice WebSocket, UDP, transport encryption, DAVE through
`davey`) and encodes with libopus; we hand it 48 kHz stereo PCM (mtm_bot.core.playback). Everything a
user can be refused for is checked before the bot joins, so a refusal never leaves it sitting in a
channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable

import discord

from mtm_bot.core.errors import InputError
from mtm_bot.core.playback import Play, PlayQueue, voice_pcm

log = logging.getLogger(__name__)

CONNECT_SECONDS = 20.0  # discord.py's voice handshake, bounded: the clicker waits for it


class CannotPlay(InputError):
    pass


def check_can_play(channel: discord.VoiceChannel | discord.StageChannel) -> None:
    """Refuse, with what to change, a channel the bot cannot be heard in."""
    permissions = channel.permissions_for(channel.guild.me)
    missing = [
        name for name, allowed in (("Connect", permissions.connect), ("Speak", permissions.speak)) if not allowed
    ]
    if missing:
        raise CannotPlay(
            f"I cannot play in {channel.mention}: I need the {' and '.join(missing)} permission"
            f"{'s' if len(missing) > 1 else ''} there."
        )
    if isinstance(channel, discord.StageChannel) and not permissions.mute_members:
        # A bot joins a stage as a listener; only a stage moderator (Mute Members) may make itself a speaker.
        raise CannotPlay(
            f"I cannot become a speaker on the stage {channel.mention}: please make me a stage "
            "moderator there (the Mute Members permission)."
        )


class GuildPlayer:
    """The queue and the voice connection of one server. `announce(play, channel)` says that a track
    starts and returns what to await when it has ended (with whether it was stopped): how is the cog's
    business."""

    def __init__(
        self,
        guild: discord.Guild,
        per_user: int,
        announce: Callable[[Play, discord.abc.GuildChannel], Awaitable[Callable[[bool], Awaitable[None]]]],
    ) -> None:
        self.guild = guild
        self.queue = PlayQueue(per_user)
        self.announce = announce
        self.voice: discord.VoiceClient | None = None
        self.lock = asyncio.Lock()  # joining, queueing and leaving take turns
        self.runner: asyncio.Task | None = None
        self.stopped = False  # the track playing now was stopped by a click

    @property
    def channel(self) -> discord.VoiceChannel | discord.StageChannel | None:
        return None if self.voice is None else self.voice.channel

    async def enqueue(self, play: Play, channel: discord.VoiceChannel | discord.StageChannel) -> int:
        """Queue `play` for `channel`, joining it if the player is idle; its place in line (0: it plays now,
        1: next). Refused when the bot plays in another channel of this server."""
        async with self.lock:
            if self.voice is None:
                check_can_play(channel)
                self.queue.add(play)  # may refuse: before joining
                try:
                    await self._join(channel)
                except BaseException:
                    self.queue.waiting.clear()
                    raise
                self.runner = asyncio.create_task(self._play_queue(), name=f"voice player {self.guild.id}")
                return 0
            if channel != self.voice.channel:
                raise CannotPlay(
                    f"I am playing in {self.voice.channel.mention} right now; join it to queue a "
                    "track there, or wait until I leave."
                )
            return self.queue.add(play)

    def stop(self) -> None:
        """End the track playing now (the next one starts, or the bot leaves)."""
        if self.voice is not None:
            self.stopped = True
            self.voice.stop()

    async def close(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.runner

    async def _join(self, channel: discord.VoiceChannel | discord.StageChannel) -> None:
        try:
            self.voice = await channel.connect(timeout=CONNECT_SECONDS, reconnect=True, self_deaf=True)
        except (TimeoutError, discord.ClientException) as error:
            log.warning("could not join voice channel %s: %r", channel.id, error)
            raise CannotPlay(f"I could not connect to {channel.mention}; please try again.") from None
        if isinstance(channel, discord.StageChannel):
            try:
                await self.guild.me.edit(suppress=False)  # a bot on a stage is a listener until it speaks
            except discord.HTTPException:
                await self._leave()
                raise CannotPlay(
                    f"Discord did not let me speak on the stage {channel.mention}; please make me a "
                    "stage moderator there (the Mute Members permission)."
                ) from None

    async def _leave(self) -> None:
        voice, self.voice = self.voice, None
        if voice is not None:
            await voice.disconnect(force=True)  # gateway op 4 with no channel

    async def _play_queue(self) -> None:
        try:
            while True:
                async with self.lock:  # a click that comes while we leave waits, then finds the player idle
                    play = self.queue.advance()
                    if play is None:
                        await self._leave()
                        return
                await self._play(play)
        except Exception:
            log.exception("the voice player of guild %s failed", self.guild.id)
            self.queue.waiting.clear()
            self.queue.now = None
            await self._leave()

    async def _play(self, play: Play) -> None:
        pcm = await asyncio.to_thread(voice_pcm, play.samples, play.rate)
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()

        def after(error: Exception | None) -> None:  # runs on discord.py's player thread
            if error is not None:
                log.error("playing job %s failed", play.job_id, exc_info=error)
            loop.call_soon_threadsafe(ended.set)

        self.stopped = False
        assert self.voice is not None  # _play_queue plays only while connected
        self.voice.play(discord.PCMAudio(io.BytesIO(pcm)), after=after, signal_type="music")
        finished = await self.announce(play, self.voice.channel)
        await ended.wait()
        await finished(self.stopped)
