"""Entry point: settings -> bot -> cogs -> run.

    python bot.py        (or `make run`)

Reads the settings from the environment and `.env`, loads the models once, starts the job scheduler
and serves the slash commands until stopped. Exit code 2 for a configuration the user must fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from cogs.utils.delivery import Delivery
from cogs.utils.errors import answer_error
from mtm_bot.core import metrics
from mtm_bot.core.errors import InputError, MTMError
from mtm_bot.core.retry import Backoff, retry
from mtm_bot.core.settings import Settings
from mtm_bot.jobs.library import Embedder, Library
from mtm_bot.jobs.queue import JobQueue
from mtm_bot.jobs.runner import JobRunner, Runner
from mtm_bot.jobs.scheduler import Scheduler
from mtm_bot.jobs.store import JobStore
from mtm_bot.transport.local import LocalRunner, stuck_job_threads

if TYPE_CHECKING:
    from mtm_bot.stages.pipeline import Pipeline

log = logging.getLogger("mtm_bot.bot")

COGS = (
    "cogs.compose",
    "cogs.compose_from",
    "cogs.caption",
    "cogs.results",
    "cogs.player",
    "cogs.queue",
    "cogs.library",
    "cogs.help",
)

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
            # voice_states: who sits in which voice channel (Play joins the clicker's), and the voice handshake
            intents=discord.Intents(guilds=True, voice_states=True),
            allowed_mentions=discord.AllowedMentions.none(),  # the one allowed ping is passed explicitly
            help_command=None,
        )
        self.settings = settings
        self.queue = JobQueue(settings)
        self.delivery = Delivery(self)
        self.submission_buckets: dict[int, app_commands.Cooldown] = {}  # user id -> rate (cogs.utils.submit)
        self.pipeline: Pipeline | None = None  # these four are set up in setup_hook
        self.store: JobStore | None = None
        self.scheduler: Scheduler | None = None
        self.library: Library | None = None
        self.tree.error(answer_error)  # sets tree.on_error; discord.py's typed way to assign it

    async def setup_hook(self) -> None:
        if self.scheduler is None:  # a login retried after a network failure must not load the models again
            await self._start_services()
        await self.sync_commands()

    async def _start_services(self) -> None:
        for name in COGS:
            await self.load_extension(name)
        self.store = await JobStore.open(self.settings)
        from mtm_bot.stages.pipeline import Pipeline  # transformers is slow to import: only once we have a token

        runner: Runner
        if self.settings.broker_url:  # distributed: the GPU workers hold the models; here they only check uploads
            from mtm_bot.transport.distributed import RemoteRunner

            self.pipeline = Pipeline(self.settings)
            runner = RemoteRunner(self.settings, self.store)
        else:
            log.info("loading the %s models (once; they stay resident)", self.settings.profile)
            self.pipeline = await asyncio.to_thread(lambda: Pipeline(self.settings).load())
            runner = LocalRunner(
                JobRunner(self.pipeline, self.store), self.settings.max_batch, self.settings.stall_seconds
            )
        # The text embedder answers /library directly, on the CPU of this process (no GPU, no queue).
        embedder = await asyncio.to_thread(Embedder.load, self.settings.embedder_id)
        self.library = self.delivery.library = await Library.open(self.settings, embedder)
        self.scheduler = Scheduler(self.settings, runner, self.store, self.queue, self.delivery)
        await self.scheduler.start()  # resumes jobs a restart interrupted; their results go to their channels
        metrics.serve(self.settings.metrics_port)

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
        if self.scheduler is not None:
            await self.scheduler.stop()  # a running job is left unfinished and resumes on the next start
        # Our databases close before Discord's connection does: once that is closed, `start` returns and
        # the event loop ends, cancelling whatever of this method is left (an open aiosqlite connection's
        # thread would then keep the process alive).
        for resource in (self.library, self.store):
            if resource is not None:
                await resource.close()
        await super().close()

    async def on_ready(self) -> None:
        log.info("ready as %s (id %s) in %d guild(s)", self.user, self.user and self.user.id, len(self.guilds))


# DNS failures, refused and dropped connections, timeouts, Discord's own 5xx: worth another try.
# A refused token (LoginFailure, 401) is not among them.
DISCORD_UNREACHABLE = (aiohttp.ClientConnectionError, asyncio.TimeoutError, discord.DiscordServerError)
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


def why_unreachable(err: BaseException) -> str:
    """A network error in a few words: "Name or service not known", "Connection refused", ..."""
    if isinstance(err, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(err, discord.DiscordServerError):
        return f"Discord answered {err.status}"
    os_error = getattr(err, "os_error", None)  # aiohttp's connector errors carry the socket's error
    if isinstance(os_error, OSError) and os_error.errno:
        if os_error.errno < 0:  # a DNS error
            return os_error.strerror or str(os_error)
        return os.strerror(os_error.errno)
    return str(err) or type(err).__name__


async def log_in(bot: MTMBot, settings: Settings, stopping: asyncio.Event) -> None:
    """`bot.login`, retried with exponential backoff while Discord cannot be reached, until `stopping` is set.

    discord.py's own reconnect loop covers the gateway later on, but not this first REST call.
    """
    token = settings.discord_token
    assert token, "main() refuses to start without DISCORD_TOKEN"

    async def login() -> None:
        try:
            await bot.login(token)
        except DISCORD_UNREACHABLE:
            # Each login opens a new HTTP session on the client's connector, and closing the session closes
            # that connector too: let the next login make a fresh one.
            await bot.http.close()
            bot.http.connector = discord.utils.MISSING
            raise

    with contextlib.suppress(*DISCORD_UNREACHABLE):  # raised only once stopping is set
        await retry(
            login,
            on=DISCORD_UNREACHABLE,
            backoff=Backoff(RETRY_FIRST_S, RETRY_MAX_S),
            stopping=stopping,
            say=lambda err, delay: log.warning(
                "Cannot reach Discord at %s (%s); retrying in %.0f s.",
                settings.discord_api_base,
                why_unreachable(err),
                delay,
            ),
        )


class OneLineReconnects(logging.Filter):
    """discord.py logs every gateway reconnect with a traceback; for a network error, one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, DISCORD_UNREACHABLE + (OSError,)) and record.getMessage().startswith(
            "Attempting a reconnect"
        ):
            record.msg, record.args = (
                f"Cannot reach the Discord gateway ({why_unreachable(err)}). {record.getMessage()}",
                (),
            )
            record.exc_info = record.exc_text = None
        return True


async def serve(settings: Settings) -> None:
    point_discord_at(settings)
    async with MTMBot(settings) as bot:
        stopping = asyncio.Event()

        def stop() -> None:
            stopping.set()
            asyncio.ensure_future(bot.close())

        # SIGTERM (docker stop, systemd) closes cleanly like Ctrl-C: a running job resumes on the next start.
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows event loops
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
        if settings.broker_url:  # distributed mode: one sentence per try while Redis cannot be reached
            from mtm_bot.transport.protocol import wait_for_redis

            if not await wait_for_redis(settings, "bot", stopping):
                return
        await log_in(bot, settings, stopping)
        await bot.connect()  # what bot.start does after login; reconnects on its own


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
    logging.getLogger("discord.client").addFilter(OneLineReconnects())
    try:
        asyncio.run(serve(settings))
    except discord.LoginFailure:
        print(
            "Discord refused DISCORD_TOKEN (401). Reset the token in the developer portal and update it.",
            file=sys.stderr,
        )
        return 2
    except discord.PrivilegedIntentsRequired as err:
        print(err, file=sys.stderr)
        return 2
    except MTMError as err:  # e.g. weights missing from the cache: a clear sentence, not a traceback
        print(err, file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    except KeyboardInterrupt:
        pass
    if stuck := stuck_job_threads():  # in a call that never returns: a normal exit would wait for them for ever
        log.warning("Leaving %d stuck job thread(s) behind: %s", len(stuck), ", ".join(stuck))
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
