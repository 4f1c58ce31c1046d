"""A job's files in transit through Redis (distributed mode): its inputs from the bot to a GPU worker, its
results back, one key each per attempt (`<p>:blob:<job>:<attempt>:<name>`, with a TTL). Which files those
are is the job kind's declaration (mtm_bot.jobs.kinds: `reads` by role, `writes` by suffix).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from ..core.settings import Settings
from ..jobs.kinds import INPUT_ROLES, RESULT_SUFFIXES, Role
from .protocol import Keys, retrying


class Blobs:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(settings.blob_ttl_hours * 3600 * 1000)

    def _result(self, job_id: str, attempt: int, suffix: str) -> str:
        return self.keys.blob(job_id, attempt, "result" + suffix)

    def put_inputs(self, pipe: Pipeline, job_id: str, attempt: int, inputs: dict[Role, bytes]) -> None:
        """Queue the inputs' writes on `pipe`: the bot's hand-out writes them with the order's attempt, at once."""
        for role, data in inputs.items():
            pipe.set(self.keys.blob(job_id, attempt, role), data, px=self.ttl_ms)

    async def fetch_input(self, job_id: str, attempt: int, role: Role, path: Path) -> bool:
        """One input into `path` (a GPU worker's scratch folder); False once it expired in Redis."""
        data = await retrying("fetching a job's files", lambda: self.redis.get(self.keys.blob(job_id, attempt, role)))
        if data is None:
            return False
        await asyncio.to_thread(path.write_bytes, data)
        return True

    async def put_results(self, job_id: str, attempt: int, files: dict[str, Path]) -> dict[str, str]:
        """A GPU worker's result files into Redis; their keys by suffix."""
        keys = {}
        for suffix, path in files.items():
            data = await asyncio.to_thread(path.read_bytes)
            key = keys[suffix] = self._result(job_id, attempt, suffix)
            await retrying("handing a result back", lambda: self.redis.set(key, data, px=self.ttl_ms))
        return keys

    async def fetch_results(self, job_id: str, attempt: int, files: dict[str, Path], sent: dict[str, str]) -> bool:
        """The bot takes the results the worker `sent` into the job's `files`; False when one is missing."""
        for suffix, path in files.items():
            if suffix not in RESULT_SUFFIXES or suffix not in sent:
                return False
            data = await self.redis.get(self._result(job_id, attempt, suffix))
            if data is None:
                return False
            partial = path.with_name(path.name + ".part")
            await asyncio.to_thread(partial.write_bytes, data)
            await asyncio.to_thread(partial.replace, path)
        return True

    def names(self, job_id: str, attempt: int, results_only: bool = False) -> list[str]:
        """Every key an attempt's files may have, of any kind."""
        names = [f"result{suffix}" for suffix in RESULT_SUFFIXES] + ([] if results_only else sorted(INPUT_ROLES))
        return [self.keys.blob(job_id, attempt, name) for name in names]

    async def delete(self, job_id: str, attempt: int, results_only: bool = False) -> None:
        await self.redis.delete(*self.names(job_id, attempt, results_only))
