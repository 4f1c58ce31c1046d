"""Entry point: settings -> bot -> cogs -> run.

    python bot.py        (or `make run`)

Reads the settings from the environment and `.env`, loads the models once, starts the job worker
and serves the slash commands until stopped. Exit code 2 for a configuration the user must fix.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING

import discord
import yarl
from discord.ext import commands

from cogs.delivery import Delivery
from cogs.errors import on_app_command_error
from mtm_bot.errors import InputError, MTMError
from mtm_bot.jobs import JobQueue, JobStore
from mtm_bot.settings import Settings
from mtm_bot.worker import Worker

if TYPE_CHECKING:
    from mtm_bot.pipeline import Pipeline

log = logging.getLogger("mtm_bot.bot")

COGS = ("cogs.compose", "cogs.caption", "cogs.queue", "cogs.help")

NO_TOKEN = (
    "DISCORD_TOKEN is not set.\n"
    "Create an application at https://discord.com/developers/applications, open Bot -> Reset Token,\n"
    "and put it into the environment or into a .env file in the directory you start the bot from\n"
    "(DISCORD_TOKEN=...).\n"
    "Invite the bot with the 'bot' and 'applications.commands' scopes."
)


def point_discord_at(settings: Settings) -> None:
    """Send REST and gateway traffic to the configured endpoints (a proxy, or the test emulator).

    A plain (unsharded) Bot connects to DEFAULT_GATEWAY and later resumes at the READY event's
    resume_gateway_url, which the endpoint itself hands out; webhooks and interaction callbacks go
    through Route.BASE like every other REST call.
    """
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class MTMBot(commands.Bot):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # slash commands only; no message content needed
            intents=discord.Intents(guilds=True),
            allowed_mentions=discord.AllowedMentions.none(),  # the one allowed ping is passed explicitly
            help_command=None,
        )
        self.settings = settings
        self.queue = JobQueue(settings)
        self.delivery = Delivery(self)
        self.pipeline: Pipeline | None = None  # these three are set up in setup_hook
        self.store: JobStore | None = None
        self.worker: Worker | None = None
        self.tree.on_error = on_app_command_error

    async def setup_hook(self) -> None:
        for name in COGS:
            await self.load_extension(name)
        self.store = await JobStore.open(self.settings)
        from mtm_bot.pipeline import Pipeline  # transformers is slow to import: only once we have a token

        log.info("loading the %s models (once; they stay resident)", self.settings.profile)
        self.pipeline = await asyncio.to_thread(lambda: Pipeline(self.settings).load())
        self.worker = Worker(self.settings, self.pipeline, self.store, self.queue, self.delivery)
        await self.worker.start()  # resumes jobs a restart interrupted; their results go to their channels
        await self.sync_commands()

    async def sync_commands(self) -> None:
        if self.settings.guild_id is not None:
            guild = discord.Object(self.settings.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands to guild %s", len(synced), self.settings.guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d global commands (Discord may take a while to show them)", len(synced))

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.stop()  # a running job is left unfinished and resumes on the next start
        await super().close()
        if self.store is not None:
            await self.store.close()

    async def on_ready(self) -> None:
        log.info("ready as %s (id %s) in %d guild(s)", self.user, self.user and self.user.id, len(self.guilds))


async def serve(settings: Settings) -> None:
    point_discord_at(settings)
    async with MTMBot(settings) as bot:
        # SIGTERM (docker stop, systemd) closes cleanly like Ctrl-C: a running job resumes on the next start.
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bot.close()))
        await bot.start(settings.discord_token)


def main() -> int:
    try:
        settings = Settings.from_env()
    except InputError as err:
        print(err, file=sys.stderr)
        return 2
    if not settings.discord_token:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    discord.utils.setup_logging(level=logging.INFO)
    try:
        asyncio.run(serve(settings))
    except discord.LoginFailure:
        print("Discord refused DISCORD_TOKEN (401). Reset the token in the developer portal and update it.",
              file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired as err:
        print(err, file=sys.stderr)
        return 2
    except MTMError as err:  # e.g. weights missing from the cache: a clear sentence, not a traceback
        print(err, file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
