"""The bot behind an interaction, typed: discord.py types `interaction.client` as a plain Client."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord

if TYPE_CHECKING:
    from bot import MTMBot


def mtm_bot(interaction: discord.Interaction) -> MTMBot:
    """`interaction.client` as the MTMBot it is (only MTMBot serves these cogs)."""
    return cast("MTMBot", interaction.client)
