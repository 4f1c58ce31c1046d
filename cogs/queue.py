"""/queue and /cancel: what is running and waiting (jobs, and tracks playing in voice), and stopping a job
(ephemeral replies)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands
from discord.ext import commands

from mtm_bot.jobs.job import Job, JobState

from .utils.render import minutes, quote, shorten

if TYPE_CHECKING:
    from bot import MTMBot

    from .player import Player

QUEUE_LINES_SHOWN = 10


def describe(job: Job) -> str:
    what = f"`{job.id}` {job.kind.value} by <@{job.user_id}>"
    return what + (f" · {quote(shorten(job.instruction, 60))}" if job.instruction else "")


class Queue(commands.Cog):
    def __init__(self, bot: MTMBot) -> None:
        self.bot: MTMBot = bot

    @app_commands.command(name="queue", description="Show the running jobs, the queue and your jobs")
    async def queue(self, interaction: discord.Interaction) -> None:
        # set up in setup_hook, before any command is served
        assert self.bot.scheduler is not None and self.bot.store is not None
        snapshot = self.bot.queue.snapshot()
        lines = []
        if not snapshot.running:
            lines.append("**Running:** nothing, the next job starts at once.")
        workers = self.bot.scheduler.runner.workers()  # GPU worker processes (distributed mode)
        if self.bot.scheduler.runner.keeps_running and not workers:
            lines.append("**GPU workers:** none connected; queued jobs start as soon as one is.")
        if workers:
            lines.append(
                f"**GPU workers:** {len(workers)} · "
                + ", ".join(f"{shorten(w.name, 40)} ({len(w.running)}/{w.capacity} busy)" for w in workers)
            )
        for job, running_left in zip(snapshot.running, snapshot.running_left):
            stage = self.bot.delivery.stage_of(job.id)
            worker = self.bot.scheduler.runner.where(job.id)
            left = f" · about {minutes(running_left)} left" if running_left is not None else ""
            lines.append(
                f"**Running:** {describe(job)}"
                + (f" on {shorten(worker, 40)}" if worker else "")
                + (f" · {stage}" if stage else "")
                + left
            )
        lines.append(f"**Queued:** {len(snapshot.queued)}")
        for entry in snapshot.queued[:QUEUE_LINES_SHOWN]:
            eta = f" · starts in about {minutes(entry.starts_in)}" if entry.starts_in is not None else ""
            lines.append(f"{entry.position}. {describe(entry.job)}{eta}")
        if len(snapshot.queued) > QUEUE_LINES_SHOWN:
            lines.append(f"… and {len(snapshot.queued) - QUEUE_LINES_SHOWN} more")
        lines += cast("Player", self.bot.get_cog("Player")).queue_lines(interaction.guild_id)  # tracks playing in voice
        mine = await self.bot.store.recent_of(interaction.user.id)
        lines.append("**Your jobs:** " + ("none yet" if not mine else ""))
        for job in mine:
            lines.append(
                f"`{job.id}` {job.kind.value} · {job.state.value}"
                + (f" · {quote(shorten(job.instruction, 60))}" if job.instruction else "")
            )
        await interaction.response.send_message(shorten("\n".join(lines), 2000), ephemeral=True)

    @app_commands.command(name="cancel", description="Stop a job (default: your newest unfinished job)")
    @app_commands.describe(job="The job id shown when the job was accepted")
    async def cancel(self, interaction: discord.Interaction, job: str | None = None) -> None:
        assert self.bot.scheduler is not None  # set up in setup_hook, before any command is served
        cancelled = await self.bot.scheduler.cancel(
            job, interaction.user.id, guild_id=interaction.guild_id, is_manager=interaction.permissions.manage_guild
        )
        if cancelled.state is JobState.RUNNING:
            text = f"Job `{cancelled.id}` is stopping at its next step."
        else:
            text = f"Job `{cancelled.id}` is cancelled."
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: MTMBot) -> None:
    await bot.add_cog(Queue(bot))
