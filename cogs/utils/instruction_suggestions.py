"""Suggestions for /compose's `instruction` while the user types: a few carol presets and this server's
recent instructions (never another server's), within Discord's limits for an autocomplete answer."""

from __future__ import annotations

import discord
from discord import app_commands

from .client import mtm_bot

MAX_CHOICES = 25  # Discord shows at most 25 suggestions ...
MAX_CHOICE_CHARS = 100  # ... and refuses a name or string value longer than this

PRESET_INSTRUCTIONS = (
    "a cosy jazz carol with sleigh bells",
    "a choir carol in a stone church",
    "a music-box lullaby carol by the fire",
    "a brass band carol on a snowy street",
    "an orchestral carol with strings and glockenspiel",
    "a folk carol with acoustic guitar and fiddle",
    "a lo-fi carol with soft rain and vinyl crackle",
    "an 8-bit chiptune carol",
)


def _tidy(text: str) -> str:
    return " ".join(text.split())


def suggestions(typed: str, recent: list[str]) -> list[str]:
    """What to offer for `typed`: the recent instructions (newest first), then the presets, those containing
    it (ignoring case), each once, at most MAX_CHOICES, with room kept for every matching preset."""
    wanted = _tidy(typed).casefold()
    presets = [preset for preset in PRESET_INSTRUCTIONS if wanted in preset.casefold()]
    offered: dict[str, str] = {}  # casefolded -> as shown
    for text in [*recent[: MAX_CHOICES - len(presets)], *presets]:
        text = _tidy(text)
        if wanted in text.casefold() and len(text) <= MAX_CHOICE_CHARS:
            offered.setdefault(text.casefold(), text)
    return list(offered.values())


async def instruction_choices(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
    """The autocomplete answer for /compose's instruction in the interaction's server (presets only in a DM)."""
    recent = []
    if interaction.guild_id is not None:
        store = mtm_bot(interaction).store
        assert store is not None  # set up in setup_hook, before any command is served
        recent = await store.recent_instructions(
            interaction.guild_id, _tidy(typed), max_chars=MAX_CHOICE_CHARS, limit=MAX_CHOICES
        )
    return [app_commands.Choice(name=text, value=text) for text in suggestions(typed, recent)]
