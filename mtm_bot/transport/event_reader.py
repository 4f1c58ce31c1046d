"""The bot's reader of its GPU workers' events (distributed mode), in a consumer group: an event is
acknowledged only once it is applied, so after a bot crash the unacknowledged ones are read again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .heartbeats import BOT_CONSUMER
from .protocol import UNAVAILABLE, Keys, redis_backoff, why

log = logging.getLogger(__name__)


class EventReader:
    def __init__(self, redis: Redis, keys: Keys, no_group_wait: float) -> None:
        self.redis = redis
        self.keys = keys
        self.no_group_wait = no_group_wait  # seconds until the stream's group may exist again (Redis emptied)

    async def ack(self, event_id: str) -> None:
        await self.redis.xack(self.keys.events, self.keys.bot_group, event_id)

    async def read(
        self, apply: Callable[[str, dict], Awaitable[None]], broken: Callable[[dict], Awaitable[None]]
    ) -> None:
        """Call `apply(event id, event as JSON)` (mtm_bot.transport.protocol.Event) for each event, in order: first (and
        again after Redis went away mid-way) this consumer's pending ones, read but never
        acknowledged, page by page; then new ones (">"). An event that `apply` fails on with anything but a lost
        Redis is acknowledged and passed to `broken(event as JSON)`; the others go on."""
        start = "0"
        backoff = redis_backoff()
        while True:
            try:
                reply = await self.redis.xreadgroup(
                    self.keys.bot_group, BOT_CONSUMER, {self.keys.events: start}, count=100, block=1000
                )
                backoff.reset()
            except UNAVAILABLE as err:
                log.warning(
                    "Redis is unavailable while reading events (%s); retrying in %.0f s.", why(err), backoff.delay
                )
                await backoff.wait()
                continue
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                await asyncio.sleep(self.no_group_wait)
                continue
            entries = [entry for _, stream_entries in reply for entry in stream_entries]
            backlog = start != ">"
            if backlog and not entries:
                start = ">"
            for event_id, fields in entries:
                message = None
                try:
                    message = json.loads(fields[b"data"])
                    await apply(event_id.decode(), message)
                except UNAVAILABLE as err:  # applied again from the pending ones: apply repeats harmlessly
                    log.warning(
                        "Redis is unavailable while applying events (%s); retrying in %.0f s.", why(err), backoff.delay
                    )
                    await backoff.wait()
                    start = "0"
                    break
                except Exception:  # e.g. the disk is full: this job fails with a sentence, the others go on
                    log.exception("Dropping an event the bot could not apply")
                    await self.ack(event_id)
                    await broken(message if isinstance(message, dict) else {})
            else:
                if backlog and entries:
                    start = entries[-1][0].decode()  # page through the backlog
