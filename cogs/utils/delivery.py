"""Showing a job's life in Discord: live status edits, then exactly one public result.

`Delivery` is the scheduler's JobListener (mtm_bot.jobs.scheduler); every call arrives on the event loop.
- While a job runs, the public reply that accepted it is edited to show the stage (captioning ->
  refining -> block i/n) and, as soon as they exist, the refined captions. Edits are coalesced to
  at most one per MIN_EDIT_SECONDS per job; the latest state always lands.
- The result is one new public message that pings only the requester: the instruction, one
  caption line per output block, and the track encoded to fit the job's stored upload limit.
- It goes out as an interaction follow-up while the token lives (15 min), else, or when Discord
  says the token is gone (401/404), to the job's channel. Jobs resumed after a restart have no
  interaction: they deliver to their channel with a note.
- A delivery method raises only when nothing was posted, so the scheduler's retry never doubles a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import discord
import soundfile as sf

from mtm_bot.core.audio import Audio, Encoded, encode_to_fit
from mtm_bot.core.errors import OutputTooLarge
from mtm_bot.core.progress import Progress
from mtm_bot.core.timecode import format_time
from mtm_bot.jobs.job import Job
from mtm_bot.jobs.kinds import KINDS, Rendering
from mtm_bot.jobs.library import Library

from .render import CONTENT_LIMIT, RESULTS_SHOWN, library_reply, minutes, quote, shorten, with_captions

if TYPE_CHECKING:
    from bot import MTMBot
    from cogs.results import Results

log = logging.getLogger(__name__)

MIN_EDIT_SECONDS = 2.0
TOKEN_LIFETIME_SECONDS = 15 * 60
TOKEN_MARGIN_SECONDS = 60  # a long upload must not cross the expiry mid-request
RESUMED_NOTE = "(This job was interrupted by a bot restart and ran again from the start.)"


@dataclass
class LiveStatus:
    """The public reply that accepted a job, and what it should currently show."""

    interaction: discord.Interaction
    job: Job
    stage: str = ""
    captions: list[str] = field(default_factory=list)
    last_edit: float = 0.0
    dirty: bool = False
    flusher: asyncio.Task | None = None
    dead: bool = False  # the token expired: no more edits
    finished: bool = False


def stage_text(progress: Progress) -> str:
    if progress.stage == "captioning":
        return "captioning the clip…"
    if progress.stage == "refining":
        return "refining the captions with your instruction…"
    if progress.stage == "generating" and progress.blocks:
        percent = f" ({100 * progress.step // progress.steps}%)" if progress.steps else ""
        return f"generating block {progress.block}/{progress.blocks}{percent}…"
    return f"{progress.stage}…"


def queue_stage(position: int | None, eta: float | None) -> str:
    if not position or (position == 1 and eta is not None and eta < 5):
        return "accepted, starting now"
    when = f", starts in about {minutes(eta)}" if eta is not None else " (no time estimate yet)"
    return f"accepted, position {position} in the queue{when}"


def origin(job: Job) -> str:
    """Where a derived job's result came from, in a few words, e.g. "extended from job `ab12cd34` by 30 s"."""
    text = KINDS[job.kind].origin
    assert text is not None, "only a derived job's result has an origin"
    return text.format(parent=job.parent_id, seconds=job.duration, redo_from=format_time(job.redo_from or 0))


def status_message(job: Job, stage: str, captions: list[str], finished: bool) -> tuple[str, list[discord.Embed]]:
    parent = f" (from job `{job.parent_id}`)" if job.parent_id else ""
    spec = KINDS[job.kind]
    header = [f"🎼 {spec.name} job `{job.id}`{parent}: {stage}"]
    if job.instruction and spec.makes_track:
        header.append(f"Instruction: {quote(job.instruction)}" + (f" · {job.duration} s" if job.duration else ""))
    if not finished:
        where = RENDERERS[spec.rendering].where
        header.append(f"{where} when it is ready; `/cancel job:{job.id}` stops it.")
    if captions:
        header.append("Refined captions:")
    return with_captions("\n".join(header), captions, title="Refined captions")


def result_message(job: Job) -> tuple[str, list[discord.Embed]]:
    lines = (job.result_json or {}).get("lines", [])
    track = KINDS[job.kind].makes_track
    if track:
        take = (job.result_json or {}).get("take")  # [k, N] for a compose job of N takes
        ready = f"take {take[0]} of {take[1]} is ready" if take else "your track is ready"
        header = [
            f"<@{job.user_id}> {ready} (job `{job.id}`" + (f": {origin(job)})." if job.parent_id else ")."),
            f"Instruction: {quote(job.instruction)}",
        ]
        picture = (job.result_json or {}).get("picture")
        if job.input_path is None:
            header.append("Made from your words and picture (no clip)." if picture else "Made from your words alone.")
        if picture:
            header.append(f"Your picture, as the bot saw it: {quote(picture)}")
    else:
        header = [f"<@{job.user_id}> the captions of your clip (job `{job.id}`):"]
    if job.resumed:
        header.append(RESUMED_NOTE)
    return with_captions("\n".join(header), lines, title="Refined captions" if track else "Captions")


def encode_result(job: Job) -> Encoded:
    """The finished WAV, re-encoded to the job's upload limit (runs in a thread: it can take seconds)."""
    samples, rate = sf.read(str(job.result_path), dtype="float32", always_2d=False)
    return encode_to_fit(Audio(samples, rate), job.attachment_size_limit)


class Delivery:
    def __init__(self, bot: MTMBot) -> None:
        self.bot = bot
        self.live: dict[str, LiveStatus] = {}
        self.library: Library | None = None  # set at start-up, before the scheduler delivers anything

    # ----------------------------------------------------------------------------- bookkeeping
    def track(self, job: Job, interaction: discord.Interaction) -> None:
        self.live[job.id] = LiveStatus(interaction, job)

    def accepted(self, job: Job, position: int | None, eta: float | None) -> None:
        """Show the job id, queue position and ETA, unless the scheduler has already started the job."""
        live = self.live.get(job.id)
        if live is not None and not live.stage:
            self._show(job, queue_stage(position, eta))

    def forget(self, job_id: str) -> None:
        live = self.live.pop(job_id, None)
        if live is not None and live.flusher is not None:
            live.flusher.cancel()

    def stage_of(self, job_id: str) -> str:
        live = self.live.get(job_id)
        return live.stage if live is not None else ""

    # ----------------------------------------------------------------------------- JobListener
    async def job_started(self, job: Job) -> None:
        self._show(job, "started")

    async def job_progress(self, job: Job, progress: Progress) -> None:
        self._show(job, stage_text(progress))

    async def job_captions(self, job: Job, lines: list[str]) -> None:
        live = self.live.get(job.id)
        if live is not None:
            live.captions = list(lines)
            self._show(job, live.stage or "started")

    async def job_finished(self, job: Job) -> None:
        await RENDERERS[KINDS[job.kind].rendering].deliver(self, job)

    async def _track(self, job: Job) -> None:
        content, embeds = result_message(job)
        encoded: Encoded | None = None
        try:
            encoded = await asyncio.to_thread(encode_result, job)
        except OutputTooLarge as err:
            content += f"\n⚠️ {err} The track is not attached; try a shorter duration."
        await self._post_result(job, content, embeds, encoded)

    async def _captions(self, job: Job) -> None:
        await self._post_result(job, *result_message(job), None)

    async def _post_result(self, job: Job, content: str, embeds: list[discord.Embed], encoded: Encoded | None) -> None:
        """The one public result message, pinging the requester; a track comes with its controls."""
        live = await self._finish_status(job, "done ✅ (see the result below)")

        def files() -> list[discord.File]:  # a fresh File per attempt: discord.py closes what it sent
            if encoded is None:
                return []
            return [discord.File(io.BytesIO(encoded.data), filename=f"mtm-{job.id}{encoded.extension}")]

        ping = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])
        # Every track is a starting point: its controls start the next job from it.
        # Any: one optional keyword for two differently overloaded send methods
        # (the Results cog owns the controls and what they do; it is always loaded: bot.COGS)
        results = cast("Results", self.bot.get_cog("Results"))
        controls: dict[str, Any] = {"view": results.controls(job)} if encoded is not None else {}
        message: discord.abc.Snowflake | None = None
        if live is not None:
            try:
                message = await live.interaction.followup.send(
                    content, embeds=embeds, files=files(), allowed_mentions=ping, **controls
                )
            except discord.HTTPException as err:
                if err.status not in (401, 404):
                    raise
                log.info("the interaction token of job %s is gone (%s); posting to the channel", job.id, err.status)
        if message is None:
            message = await self._channel(job).send(
                content, embeds=embeds, files=files(), allowed_mentions=ping, **controls
            )
        if encoded is not None and job.guild_id is not None:
            await self._add_to_library(job, message.id)

    async def _midi_file(self, job: Job) -> None:
        """The MIDI file goes to whoever clicked."""
        assert job.result_json is not None  # a finished job
        notes = job.result_json["notes"]
        content = (
            f"🎹 The notes of job `{job.parent_id}`: {notes} note{'s' * (notes != 1)}, as a MIDI file."
            if notes
            else f"🎹 I found no notes in job `{job.parent_id}`; the MIDI file is empty."
        )
        await self._answer_privately(
            job, content, lambda: [discord.File(str(job.result_path), filename=f"mtm-{job.parent_id}.mid")]
        )

    async def _library_matches(self, job: Job) -> None:
        """/library image: search this server's library with the picture's description."""
        assert self.library is not None, "the library is set up before the scheduler starts delivering"
        assert job.result_json is not None and job.guild_id is not None  # a finished job; /library is guild_only
        picture = job.result_json["picture"]
        content = library_reply(
            f"your picture, as I see it: {quote(picture)}",
            await self.library.search(job.guild_id, picture, limit=RESULTS_SHOWN),
        )
        await self._answer_privately(job, content)

    async def _answer_privately(self, job: Job, content: str, files: Callable[[], list[discord.File]] = list) -> None:
        """A result for the requester alone (ephemeral), or, once the interaction is gone, in the channel
        with a ping. `files` makes fresh Files per attempt: discord.py closes what it sent."""
        live = await self._finish_status(job, "done ✅")
        if live is not None:
            try:
                await live.interaction.followup.send(
                    content, files=files(), ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
                )
                return
            except discord.HTTPException as err:
                if err.status not in (401, 404):
                    raise
        ping = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.user_id)])
        await self._channel(job).send(
            shorten(f"<@{job.user_id}> {content}", CONTENT_LIMIT), files=files(), allowed_mentions=ping
        )

    async def _add_to_library(self, job: Job, message_id: int) -> None:
        """Make a posted track findable with /library. The result is already out: a failure here is
        logged, never raised, or the scheduler would post the result again."""
        try:
            assert self.library is not None, "the library is set up before the scheduler starts delivering"
            await self.library.add(job, message_id)
        except Exception:
            log.exception("could not add job %s to the library", job.id)

    async def job_failed(self, job: Job, message: str) -> None:
        """The public status says that the job failed; the reason goes to the requester privately
        (ephemeral), or, without a live interaction, to the channel."""
        live = await self._finish_status(job, "failed ❌ (I sent you the reason)")
        if live is not None:
            with contextlib.suppress(discord.HTTPException):
                await live.interaction.followup.send(f"Job `{job.id}` failed: {message}", ephemeral=True)
                return
        note = f" {RESUMED_NOTE}" if job.resumed else ""
        await self._channel(job).send(f"<@{job.user_id}> job `{job.id}` failed: {message}{note}")

    async def job_cancelled(self, job: Job) -> None:
        await self._finish_status(job, "cancelled 🛑")

    # ----------------------------------------------------------------------------- internals
    def _show(self, job: Job, stage: str) -> None:
        live = self.live.get(job.id)
        if live is None or live.dead:
            return
        live.stage, live.dirty = stage, True
        if live.flusher is None:
            live.flusher = asyncio.create_task(self._flush(live), name=f"status-{job.id}")

    async def _flush(self, live: LiveStatus) -> None:
        try:
            while live.dirty and not live.dead:
                wait = live.last_edit + MIN_EDIT_SECONDS - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                live.dirty = False
                await self._edit(live)
        finally:
            live.flusher = None

    async def _edit(self, live: LiveStatus) -> None:
        content, embeds = status_message(live.job, live.stage, live.captions, live.finished)
        live.last_edit = time.monotonic()
        try:
            await live.interaction.edit_original_response(content=content, embeds=embeds)
        except discord.HTTPException as err:
            # 401/404: the token expired (or the message was deleted); stop editing it.
            live.dead = err.status in (401, 404)
            log.warning("could not update the status of job %s (%s)", live.job.id, err.status)

    async def _finish_status(self, job: Job, stage: str) -> LiveStatus | None:
        """Final edit of the status reply. Returns the job's live interaction while its token
        still works (for the result follow-up), else None: then the channel is the way to the user."""
        live = self.live.pop(job.id, None)
        if live is None or live.dead or not self._token_alive(job):
            return None
        if live.flusher is not None:
            live.flusher.cancel()
            await asyncio.gather(live.flusher, return_exceptions=True)
        await asyncio.sleep(max(0.0, live.last_edit + MIN_EDIT_SECONDS - time.monotonic()))
        live.stage, live.finished = stage, True
        await self._edit(live)
        return None if live.dead else live

    def _token_alive(self, job: Job) -> bool:
        return time.time() - job.created_at < TOKEN_LIFETIME_SECONDS - TOKEN_MARGIN_SECONDS

    def _channel(self, job: Job) -> discord.PartialMessageable:
        return self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)


@dataclass(frozen=True)
class Renderer:
    """How a Rendering (mtm_bot.jobs.kinds) shows in Discord."""

    deliver: Callable[[Delivery, Job], Awaitable[None]]  # posts the finished job's result
    where: str  # what the status reply says while the job runs


RENDERERS = {
    Rendering.TRACK: Renderer(Delivery._track, "You will be pinged here"),
    Rendering.CAPTIONS: Renderer(Delivery._captions, "You will be pinged here"),
    Rendering.MIDI_FILE: Renderer(Delivery._midi_file, "The file appears here"),
    Rendering.PICTURE_SEARCH: Renderer(Delivery._library_matches, "The matches appear here"),
}
