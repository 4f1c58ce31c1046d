"""Accepting a request as a job: /compose (a clip, a picture, both or neither), /caption, /library's
picture search, and the buttons under a result (jobs derived from it).

What metadata alone can refuse is refused before the defer; a decode error after it answers ephemerally
(docs/ARCHITECTURE.md, "Accepting a request").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import discord
from discord import app_commands

from mtm_bot.core.audio import megabytes
from mtm_bot.core.errors import FileTooLarge, ImageFileTooLarge, InputError, NotAnImage, NotAudio
from mtm_bot.jobs.job import Job, JobKind
from mtm_bot.jobs.kinds import KINDS, Request
from mtm_bot.stages.image_captioner import IMAGE_EXTENSIONS

from .client import mtm_bot
from .errors import THINKING

AUDIO_EXTENSIONS = {
    ".wav",
    ".wave",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".aif",
    ".aiff",
}  # libsndfile reads these


class DownloadFailed(InputError):
    pass


class EmptyInstruction(InputError):
    pass


def typed_seconds(text: str) -> int | None:
    """A modal's seconds field as a number ("30", "30 s", "30s"); None unless it is a whole number."""
    text = text.strip().removesuffix("s").strip()
    return int(text) if text.isascii() and text.isdigit() else None  # "²".isdigit(), yet int("²") fails


def check_submission_rate(interaction: discord.Interaction) -> bool:
    """Per-user submissions per minute (settings.submissions_per_minute), one budget for /compose, /caption
    and the buttons under a result; CommandOnCooldown says when to retry."""
    bot = mtm_bot(interaction)
    buckets: dict[int, app_commands.Cooldown] = bot.submission_buckets
    if len(buckets) > MAX_IDLE_BUCKETS:  # forget users whose window has passed
        for user_id in [u for u, b in buckets.items() if b.get_tokens() == b.rate]:
            del buckets[user_id]
    bucket = buckets.setdefault(interaction.user.id, app_commands.Cooldown(bot.settings.submissions_per_minute, 60.0))
    retry_after = bucket.update_rate_limit()
    if retry_after:
        raise app_commands.CommandOnCooldown(bucket, retry_after)
    return True


MAX_IDLE_BUCKETS = 1000
submission_rate_limit = app_commands.check(check_submission_rate)


@dataclass(frozen=True)
class Upload:
    """What an attachment option takes, and how it tells a user what to send instead."""

    media_type: str  # "audio" or "image": the content type's first part
    extensions: frozenset[str]  # trusted when Discord sends a vague content type
    vague_types: frozenset[str]
    too_large: type[InputError]
    wrong_kind: type[InputError]
    what: str  # what the file is not, in "`x.txt` is text/plain, not {what}"
    smaller: str  # what to upload instead of a file over the limit
    instead: str  # what to attach instead of a file of another kind


# Discord sometimes sends no type, a generic one, or video/ogg for audio; then the extension decides.
AUDIO = Upload(
    "audio",
    frozenset(AUDIO_EXTENSIONS),
    frozenset({"", "application/octet-stream", "video/ogg"}),
    FileTooLarge,
    NotAudio,
    "audio",
    "a shorter or compressed clip (MP3 or OGG)",
    "a WAV, FLAC, OGG or MP3 clip",
)
IMAGE = Upload(
    "image",
    frozenset(IMAGE_EXTENSIONS),
    frozenset({"", "application/octet-stream"}),
    ImageFileTooLarge,
    NotAnImage,
    "a picture",
    "a smaller PNG, JPEG, WebP or GIF",
    "a PNG, JPEG, WebP or GIF",
)


def is_upload_of(attachment: discord.Attachment, upload: Upload = AUDIO) -> bool:
    """Whether the attachment is of this kind by its content type, or by its extension where that type is vague."""
    content_type, extension = _type_and_extension(attachment)
    return content_type.startswith(upload.media_type + "/") or (
        content_type in upload.vague_types and extension in upload.extensions
    )


def _type_and_extension(attachment: discord.Attachment) -> tuple[str, str]:
    return (attachment.content_type or "").split(";")[0].strip().lower(), PurePosixPath(
        attachment.filename
    ).suffix.lower()


def check_attachment(attachment: discord.Attachment, max_bytes: int, upload: Upload = AUDIO) -> None:
    """Refuse from metadata alone, before a byte is downloaded."""
    if attachment.size > max_bytes:
        raise upload.too_large(
            f"`{attachment.filename}` is {megabytes(attachment.size)}; the limit is "
            f"{megabytes(max_bytes)}. Please upload {upload.smaller}."
        )
    if not is_upload_of(attachment, upload):
        content_type, extension = _type_and_extension(attachment)
        kind = content_type or f"a {extension or 'extension-less'} file"
        raise upload.wrong_kind(
            f"`{attachment.filename}` is {kind}, not {upload.what}. Please attach {upload.instead}."
        )


async def download(attachment: discord.Attachment) -> bytes:
    try:
        return await attachment.read()
    except discord.HTTPException as err:
        raise DownloadFailed(
            f"I could not download `{attachment.filename}` from Discord ({err.status}). Please try again."
        ) from None


async def defer_publicly(interaction: discord.Interaction) -> None:
    await interaction.response.defer(thinking=True)
    interaction.extras[THINKING] = True


async def accept(
    interaction: discord.Interaction,
    audio: discord.Attachment | None,
    kind: JobKind,
    instruction: str = "",
    duration: int | None = None,
    image: discord.Attachment | None = None,
    takes: int = 1,
) -> None:
    """Validate, defer, download, decode, queue; the reply then shows the job id, queue position and ETA.

    A compose job without `audio` is made from the instruction (and `image`) alone."""
    bot = mtm_bot(interaction)
    settings = bot.settings
    makes_track = KINDS[kind].makes_track
    if makes_track and not instruction:
        raise EmptyInstruction("The instruction is empty; describe the music you want, e.g. 'a cosy jazz carol'.")
    if audio is not None:
        check_attachment(audio, settings.max_upload_bytes)
    if image is not None:
        check_attachment(image, settings.max_upload_bytes, IMAGE)
    bot.queue.check(interaction.user.id)

    async def store_uploads(job: Job) -> None:
        assert bot.store is not None and bot.pipeline is not None  # set up in setup_hook, before any command is served
        clip = None
        if audio is not None:
            job.input_path = await bot.store.save_input(job.id, await download(audio), audio.filename)
            clip = await asyncio.to_thread(bot.pipeline.read_clip, job.input_path)
        if image is not None:
            job.image_path = await bot.store.save_input(job.id, await download(image), image.filename, role="image")
            await asyncio.to_thread(bot.pipeline.read_image, job.image_path)  # a bad picture is refused now
        if makes_track:
            job.duration = bot.pipeline.output_duration(clip, duration)

    await submit(
        interaction,
        Job.new(kind, **_origin(interaction), instruction=instruction, duration=duration, takes=takes),
        store_uploads,
    )


async def accept_derived(
    interaction: discord.Interaction,
    parent_id: str,
    kind: JobKind,
    *,
    instruction: str | None = None,
    seconds: int | None = None,
    redo_from: int | None = None,
    captions: list[str] | None = None,
) -> Job:
    """A click under a result: an ordinary job of whoever clicked, built on that track (its parent).

    Refused like any submission (rate, per-user and queue limits) and, ephemerally, when the result has
    expired or the request does not fit it. Whether the result is public is the kind's (mtm_bot.jobs.kinds)."""
    bot = mtm_bot(interaction)
    check_submission_rate(interaction)
    assert bot.store is not None  # set up in setup_hook, before any command is served
    parent = await bot.store.parent_for(parent_id)
    instruction = parent.instruction if instruction is None else instruction
    generates = KINDS[kind].generates
    assert generates is not None and parent.result_json is not None  # a derived kind; a kept (finished) track
    # Seconds of music the job generates (for the queue's ETA); refuses what cannot fit.
    duration = generates(
        round(parent.result_json["duration"]),
        Request(instruction, seconds, redo_from, None if captions is None else tuple(captions)),
        bot.settings.max_output_seconds,
    )
    bot.queue.check(interaction.user.id)
    job = Job.new(
        kind,
        **_origin(interaction),
        instruction=instruction,
        duration=duration,
        parent_id=parent.id,
        redo_from=redo_from,
        captions=captions,
    )

    async def link(job: Job) -> None:
        assert bot.store is not None
        await bot.store.link_parent(job, parent)

    await submit(interaction, job, link)
    return job


def _origin(interaction: discord.Interaction) -> dict:
    """Who asked, where, and how to answer them: the fields every job takes from its interaction."""
    return dict(
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        attachment_size_limit=interaction.filesize_limit,
        application_id=interaction.application_id,
        interaction_token=interaction.token,
    )


async def submit(interaction: discord.Interaction, job: Job, prepare: Callable[[Job], Awaitable[None]]) -> None:
    """Defer, store the job's inputs (`prepare`: may refuse), queue it and show its place in the queue."""
    bot = mtm_bot(interaction)
    assert bot.scheduler is not None and bot.store is not None  # set up in setup_hook, before any command is served
    if KINDS[job.kind].private:  # /library image:, MIDI: its status and result are for the caller only
        await interaction.response.defer(ephemeral=True, thinking=True)
    else:
        await defer_publicly(interaction)
    try:
        await prepare(job)
        bot.delivery.track(job, interaction)  # before submit: the scheduler may start it at once
        position = await bot.scheduler.submit(job)
    except Exception:  # refused or broken: keep nothing of the job
        bot.delivery.forget(job.id)
        await bot.store.delete_files(job.id)
        raise
    interaction.extras.pop(THINKING, None)  # accepted: from here on the public reply shows the job
    bot.delivery.accepted(job, position, bot.queue.eta(job.id))
