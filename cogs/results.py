"""The controls under every track: Reroll, Extend, Remix, Redo from…, MIDI, Edit captions, Play.

Each is a DynamicItem whose custom_id carries the track's job id (`mtm:<action>:<job id>`), registered
at start-up, so the controls of a result posted before a restart keep working for as long as the track
is kept. A click is a submission like /compose: anyone in the channel may build on a result; the job is
theirs, refused by the same rate, per-user and queue limits, and its parent is the track clicked on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self, cast

import discord
from discord.ext import commands

from mtm_bot.core.instruction import MAX_INSTRUCTION_CHARS, check_instruction
from mtm_bot.core.timecode import format_time
from mtm_bot.jobs.job import Job, JobKind
from mtm_bot.stages.pipeline import MAX_EXTEND_SECONDS, MIN_EXTEND_SECONDS, parse_edited_captions

from .utils.client import mtm_bot
from .utils.errors import answer_error, reply_error
from .utils.submit import EmptyInstruction, accept_derived, typed_seconds

if TYPE_CHECKING:
    from discord.types.interactions import SelectMessageComponentInteractionData

    from bot import MTMBot

    from .player import Player

JOB_ID = r"(?P<job>[0-9a-f]{8})"
DEFAULT_EXTEND_SECONDS = 30
MAX_SELECT_OPTIONS = 25  # Discord's limit per select
MAX_TEXT_INPUT_CHARS = 4000  # Discord's limit for a text input's value


async def build_on(interaction: discord.Interaction, job_id: str, kind: JobKind, **request) -> None:
    """Submit the derived job; whatever refuses it is answered to the clicker alone. Component callbacks
    have no command error handler to fall back on (discord.py only logs what they raise)."""
    try:
        await accept_derived(interaction, job_id, kind, **request)
    except Exception as error:
        await answer_error(interaction, error)


class _JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"mtm:(?P<action>[a-z]+):" + JOB_ID):
    """A button that acts on the job in its custom_id (the base of each DynamicItem below; never registered
    itself, its template only satisfies DynamicItem)."""

    action: str
    label: str
    emoji: str

    def __init__(self, job_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label=self.label,
                emoji=self.emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"mtm:{self.action}:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> Self:
        return cls(match["job"])


class RerollButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:reroll:{JOB_ID}"):
    action, label, emoji = "reroll", "Reroll", "🎲"

    async def callback(self, interaction: discord.Interaction) -> None:
        await build_on(interaction, self.job_id, JobKind.REROLL)


class ExtendButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:extend:{JOB_ID}"):
    action, label, emoji = "extend", "Extend", "➕"

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(ExtendModal(self.job_id))


class RemixButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:remix:{JOB_ID}"):
    action, label, emoji = "remix", "Remix", "🎨"

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(RemixModal(self.job_id))


class MidiButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:midi:{JOB_ID}"):
    action, label, emoji = "midi", "MIDI", "🎹"

    async def callback(self, interaction: discord.Interaction) -> None:
        await build_on(interaction, self.job_id, JobKind.MIDI)


class EditCaptionsButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:edit:{JOB_ID}"):
    action, label, emoji = "edit", "Edit captions", "✏️"

    async def callback(self, interaction: discord.Interaction) -> None:
        store = mtm_bot(interaction).store
        assert store is not None  # set in setup_hook, before any click is served
        try:
            parent = await store.parent_for(self.job_id)
        except Exception as error:
            await answer_error(interaction, error)
            return
        result = parent.result_json or {}  # a kept track is a finished job: it has its result
        await interaction.response.send_modal(
            EditCaptionsModal(self.job_id, result["lines"], [(b["start"], b["end"]) for b in result["blocks"]])
        )


class PlayButton(_JobButton, discord.ui.DynamicItem[discord.ui.Button], template=rf"mtm:play:{JOB_ID}"):
    """Plays the track in the clicker's voice or stage channel (cogs.player); no job is made."""

    action, label, emoji = "play", "Play", "▶️"

    async def callback(self, interaction: discord.Interaction) -> None:
        await cast("Player", mtm_bot(interaction).get_cog("Player")).play(interaction, self.job_id)


class RedoSelect(discord.ui.DynamicItem[discord.ui.Select], template=rf"mtm:redo:{JOB_ID}"):
    """Redo from a block start: everything before it is kept, the rest generated again."""

    def __init__(self, job_id: str, starts: Sequence[int] = ()) -> None:
        options = [discord.SelectOption(label=f"Redo from {format_time(t)}", value=str(t)) for t in starts]
        super().__init__(
            discord.ui.Select(
                placeholder="Redo from…",
                custom_id=f"mtm:redo:{job_id}",
                options=options[:MAX_SELECT_OPTIONS] or [discord.SelectOption(label="-")],
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> Self:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        data = cast("SelectMessageComponentInteractionData", interaction.data)  # a select's click
        await build_on(interaction, self.job_id, JobKind.REDO, redo_from=int(data["values"][0]))


class ExtendModal(discord.ui.Modal, title="Extend the track"):
    seconds: discord.ui.TextInput[ExtendModal] = discord.ui.TextInput(
        label=f"Seconds to add ({MIN_EXTEND_SECONDS}–{MAX_EXTEND_SECONDS})",
        default=str(DEFAULT_EXTEND_SECONDS),
        min_length=1,
        max_length=3,
    )

    def __init__(self, job_id: str) -> None:
        super().__init__()  # a random custom_id: two people may have this result's modal open at once
        self.job_id = job_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        seconds = typed_seconds(self.seconds.value)
        if seconds is None:  # the range is Extend's own rule (check_extension), asked before queueing
            text = discord.utils.escape_markdown(self.seconds.value.strip()[:20])
            await reply_error(
                interaction,
                f"Please give a whole number of seconds from {MIN_EXTEND_SECONDS} to "
                f"{MAX_EXTEND_SECONDS}, not “{text}”.",
            )
            return
        await build_on(interaction, self.job_id, JobKind.EXTEND, seconds=seconds)


class RemixModal(discord.ui.Modal, title="Remix in another style"):
    instruction: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
        label="New instruction",
        style=discord.TextStyle.paragraph,
        placeholder="e.g. a cosy jazz carol with sleigh bells",
        min_length=1,
        max_length=MAX_INSTRUCTION_CHARS,
    )

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:
            instruction = check_instruction(self.instruction.value)
            if not instruction:
                raise EmptyInstruction("The instruction is empty; describe the style you want.")
        except Exception as error:
            await answer_error(interaction, error)
            return
        await build_on(interaction, self.job_id, JobKind.REMIX, instruction=instruction)


class EditCaptionsModal(discord.ui.Modal, title="Edit the captions"):
    lines: discord.ui.TextInput[EditCaptionsModal] = discord.ui.TextInput(
        label="One line per block: M:SS–M:SS caption",
        style=discord.TextStyle.paragraph,
        min_length=1,
        max_length=MAX_TEXT_INPUT_CHARS,
    )

    def __init__(self, job_id: str, lines: list[str], ranges: list[tuple[float, float]]) -> None:
        super().__init__()
        self.job_id, self.ranges = job_id, ranges
        self.lines.default = "\n".join(lines)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:  # refused before anything is queued: the answer says which line to fix
            captions = parse_edited_captions(self.lines.value, self.ranges)
        except Exception as error:
            await answer_error(interaction, error)
            return
        await build_on(interaction, self.job_id, JobKind.EDIT, captions=captions)


def result_controls(job: Job) -> discord.ui.View:
    """The controls under a finished track: the buttons (Discord fits five to a row), and the Redo select
    where there is a later block to redo from."""
    view = discord.ui.View(timeout=None)
    for button in RESULT_BUTTONS:
        view.add_item(button(job.id))
    starts = [round(block["start"]) for block in (job.result_json or {}).get("blocks", [])[1:]]
    if starts:
        view.add_item(RedoSelect(job.id, starts))
    return view


RESULT_BUTTONS = (RerollButton, ExtendButton, RemixButton, MidiButton, PlayButton, EditCaptionsButton)


class Results(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot

    async def cog_load(self) -> None:
        # Registered before the first event: a click on any result still kept is understood.
        self.bot.add_dynamic_items(*RESULT_BUTTONS, RedoSelect)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*RESULT_BUTTONS, RedoSelect)

    def controls(self, job: Job) -> discord.ui.View:
        """What delivery puts under a finished track (cogs.utils.delivery)."""
        return result_controls(job)


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Results(bot))
