"""“Compose from this”: a message command (Apps → Compose from this) that makes a track from the audio on
any message: a voice message recorded on a phone (OGG/Opus, 48 kHz) or an audio file.

Discord does not let a bot attach an existing message to a slash command, so a message context menu is
the way in. It asks for the instruction (and, optionally, the length) in a modal, then queues an ordinary
compose job from that audio exactly as /compose with `audio` does (cogs.submit.accept): the same checks,
download, limits and result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.core.errors import InputError
from mtm_bot.core.instruction import MAX_INSTRUCTION_CHARS, check_instruction
from mtm_bot.jobs.job import JobKind
from mtm_bot.stages.pipeline import BLOCK_SECONDS

from .utils.errors import answer_error
from .utils.submit import accept, check_attachment, check_submission_rate, is_upload_of, typed_seconds

if TYPE_CHECKING:
    from bot import MTMBot

MENU_NAME = "Compose from this"


class NoAudioInMessage(InputError):
    pass


class BadDuration(InputError):
    pass


def audio_of(message: discord.Message) -> discord.Attachment:
    """The message's first audio attachment (a voice message carries exactly one); NoAudioInMessage otherwise."""
    audio = next((attachment for attachment in message.attachments if is_upload_of(attachment)), None)
    if audio is None:
        raise NoAudioInMessage(
            f"This message has no audio: use {MENU_NAME} on a voice message or on a message with an audio file "
            "(WAV, FLAC, OGG, MP3), or run /compose with an `audio` clip."
        )
    return audio


def requested_duration(text: str, max_seconds: int) -> int | None:
    """The modal's optional length: None when left empty, else whole seconds within BLOCK_SECONDS..max_seconds."""
    if not text.strip():
        return None
    seconds = typed_seconds(text)
    if seconds is None or not BLOCK_SECONDS <= seconds <= max_seconds:
        shown = discord.utils.escape_markdown(text.strip()[:20])
        raise BadDuration(
            f"The length must be a whole number of seconds from {BLOCK_SECONDS} to {max_seconds}, "
            f"not “{shown}”; leave it empty for the clip's length rounded up to {BLOCK_SECONDS} s."
        )
    return seconds


class ComposeFromModal(discord.ui.Modal, title=MENU_NAME):
    instruction: discord.ui.Label[ComposeFromModal] = discord.ui.Label(
        text="Instruction",
        component=discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            placeholder="e.g. a cosy jazz carol with sleigh bells",
            min_length=1,
            max_length=MAX_INSTRUCTION_CHARS,
        ),
    )
    duration: discord.ui.Label[ComposeFromModal] = discord.ui.Label(
        text="Length in seconds (optional)", component=discord.ui.TextInput(required=False, max_length=10)
    )

    def __init__(self, audio: discord.Attachment, max_seconds: int) -> None:
        super().__init__()  # a random custom_id: several people may compose from one message at once
        self.audio = audio
        self.max_seconds = max_seconds
        self.duration.description = (
            f"{BLOCK_SECONDS} to {max_seconds}; empty: the clip's length rounded up to {BLOCK_SECONDS} s"
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        # Label types its component as any Item; these are the TextInputs declared above.
        assert isinstance(self.duration.component, discord.ui.TextInput)
        assert isinstance(self.instruction.component, discord.ui.TextInput)
        duration = requested_duration(self.duration.component.value, self.max_seconds)  # a typo costs no submission
        check_submission_rate(interaction)
        instruction = check_instruction(self.instruction.component.value)
        await accept(interaction, self.audio, JobKind.COMPOSE, instruction=instruction, duration=duration)

    # discord.py's Modal.on_error takes (interaction, error) but its base BaseView.on_error also takes the
    # item: Modal's own signature narrows its base's, and mypy sees that in every Modal subclass's override.
    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await answer_error(interaction, error)


class ComposeFrom(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot
        # Context menus cannot be declared inside a cog class; the cog adds and removes its own.
        self.menu = app_commands.ContextMenu(name=MENU_NAME, callback=self.compose_from)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    async def compose_from(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Refuse what metadata already tells (no audio, too large, queue limits) before the user types."""
        audio = audio_of(message)
        check_attachment(audio, self.bot.settings.max_upload_bytes)
        self.bot.queue.check(interaction.user.id)
        await interaction.response.send_modal(ComposeFromModal(audio, self.bot.settings.max_output_seconds))


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(ComposeFrom(bot))
