"""Turning errors into replies: specific and ephemeral for what a user caused, never a traceback."""

from __future__ import annotations

import logging
from datetime import timedelta

import discord
from discord import app_commands

from mtm_bot.core.errors import InputError

log = logging.getLogger(__name__)

THINKING = "thinking"  # Interaction.extras key: a public "thinking" message is showing


async def reply_error(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer, whatever state the interaction is in."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    if interaction.extras.pop(THINKING, False):
        # The first follow-up after a public defer would replace "thinking" and be public too:
        # remove the thinking message so the error can be a fresh, ephemeral message.
        await interaction.delete_original_response()
    await interaction.followup.send(text, ephemeral=True)


def error_text(interaction: discord.Interaction, error: Exception) -> str:
    """What to tell the user: the sentence of an error they caused, else that it was logged (and log it)."""
    original = getattr(error, "original", error)  # a command's CommandInvokeError wraps what it raised
    if isinstance(error, app_commands.CommandOnCooldown):
        retry_at = discord.utils.format_dt(discord.utils.utcnow() + timedelta(seconds=error.retry_after), "R")
        return (
            f"You are sending requests faster than {error.cooldown.rate} per minute. "
            f"Please try again in {error.retry_after:.0f} s ({retry_at})."
        )
    if isinstance(original, InputError):
        return str(original)
    where = f"/{interaction.command.qualified_name}" if interaction.command else "a button"
    log.error("%s failed for user %s", where, interaction.user.id, exc_info=original)
    return "Something went wrong on my side while handling that; it has been logged. Please try again."


async def answer_error(interaction: discord.Interaction, error: Exception) -> None:
    """The slash commands' error handler; the result controls' callbacks answer their errors with it too."""
    try:
        await reply_error(interaction, error_text(interaction, error))
    except discord.HTTPException:
        log.warning("could not send the error reply for interaction %s", interaction.id, exc_info=True)
