"""The bot's view of its GPU workers (distributed mode): who is alive, by their heartbeats, and which orders
a worker took and then died with before its heartbeat said so.
"""

from __future__ import annotations

import json
import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from taskiq.abc.broker import AsyncBroker

from .protocol import PROTOCOL_VERSION, Heartbeat, Keys, Order, OtherVersion

log = logging.getLogger(__name__)

BOT_CONSUMER = "bot"  # the bot's name in the job stream's consumer group, where it claims a dead worker's orders


class WorkerWatch:
    def __init__(self, redis: Redis, keys: Keys, broker: AsyncBroker) -> None:
        self.redis = redis
        self.keys = keys
        self.broker = broker
        self.live: dict[str, Heartbeat] = {}  # worker id -> its last heartbeat
        self._told_incompatible: set[str] = set()

    @property
    def capacity(self) -> int:
        return sum(beat.capacity for beat in self.live.values() if beat.compatible)

    async def read(self) -> None:
        """The live workers: those whose heartbeat key has not expired."""
        keys = [key async for key in self.redis.scan_iter(match=self.keys.worker("*"), count=100)]
        live = {}
        for raw in await self.redis.mget(keys) if keys else []:
            if raw is None:
                continue
            beat = Heartbeat.from_json(json.loads(raw))
            if not beat.compatible and beat.id not in self._told_incompatible:
                self._told_incompatible.add(beat.id)
                log.error(
                    "GPU worker %s speaks protocol version %s, this bot version %d: it gets no jobs. Run the "
                    "same MTM Bot release on the bot and its workers.",
                    beat.name,
                    beat.version,
                    PROTOCOL_VERSION,
                )
            live[beat.id] = beat
        self.live = live

    async def reclaim_from_the_dead(self) -> list[tuple[str, Order]]:
        """Orders that workers no longer alive had taken: claimed and acknowledged here (so no one else takes
        them), each with the name of the dead worker, for the bot to hand out again."""
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.jobs, self.keys.workers_group)
        except ResponseError:  # no stream or group yet
            return []
        orphans = []
        for consumer in consumers:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name in self.live or name == BOT_CONSUMER:
                continue
            if consumer["pending"]:
                pending = await self.redis.xpending_range(
                    self.keys.jobs, self.keys.workers_group, min="-", max="+", count=100, consumername=name
                )
                ids = [entry["message_id"] for entry in pending]
                claimed = await self.redis.xclaim(
                    self.keys.jobs, self.keys.workers_group, BOT_CONSUMER, min_idle_time=0, message_ids=ids
                )
                for _, message in claimed:
                    try:
                        orphans.append((name, Order.from_json(self.broker.formatter.loads(message[b"data"]).args[0])))
                    except (OtherVersion, KeyError, TypeError, ValueError):
                        pass  # not an order this bot gave
                await self.redis.xack(self.keys.jobs, self.keys.workers_group, *ids)
            await self.redis.xgroup_delconsumer(self.keys.jobs, self.keys.workers_group, name)
        return orphans
