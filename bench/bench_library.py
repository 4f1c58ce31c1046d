"""What /library costs the bot process: embedder memory, embedding time per request, search time.

    python -m bench.bench_library [--entries 10000] [--repeats 30] [--threads N]

Prints the resident memory the embedder adds to the bot process (RSS with the tiny pipeline already
loaded, so the transformers modules the bot imports anyway are counted once, before and after loading
the embedder and embedding once; --bare: in a process with only torch and transformers imported,
where importing BERT's modules costs most), the median time to embed one query on the
CPU, and the median time of a search over one server's `--entries` tracks (the SQLite read, the cosine
and the ranking; vectors are random unit vectors: their content does not change the cost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.memory import resident_mib

QUERIES = [
    "sleigh bells and brass, festive",
    "chill beats with crackly record noise for homework",
    "angry heavy guitars and very fast drumming",
    "slow beatless atmosphere floating through the cosmos",
]


def median_ms(run, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def bench_search(embedder, entries: int, repeats: int) -> tuple[float, float]:
    from mtm_bot.core.settings import Settings
    from mtm_bot.jobs.library import Library

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(storage_dir=Path(folder))
        library = await Library.open(settings, embedder)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((entries, embedder.dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        now = time.time()
        with sqlite3.connect(settings.database_path) as db:
            db.executemany(
                "INSERT INTO library (job_id, guild_id, channel_id, message_id, user_id, title, created_at, text, "
                "model, embedding) VALUES (?, 1, 2, ?, 3, ?, ?, ?, ?, ?)",
                [
                    (f"{i:08x}", i, f"track {i}", now, f"track {i}", embedder.model_id, v.tobytes())
                    for i, v in enumerate(vectors)
                ],
            )
        query = embedder.embed(["festive brass"])[0]

        nearest_times, search_times = [], []
        for i in range(repeats):
            start = time.perf_counter()
            matches = await library.nearest(1, query)
            nearest_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            await library.search(1, QUERIES[i % len(QUERIES)])
            search_times.append(time.perf_counter() - start)
        assert len(matches) == 5
        await library.close()
    return 1000 * statistics.median(nearest_times), 1000 * statistics.median(search_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--bare", action="store_true", help="measure memory without the pipeline loaded first")
    args = parser.parse_args()

    import torch
    import transformers  # noqa: F401

    from mtm_bot.core.settings import Settings
    from mtm_bot.jobs.library import Embedder
    from mtm_bot.stages.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.bare:
        Pipeline(Settings(profile="tiny", device="cpu")).load()  # what the bot process holds already
    before = resident_mib()
    start = time.perf_counter()
    embedder = Embedder.load()
    embedder.embed(["warm-up"])
    load_s = time.perf_counter() - start
    added = resident_mib() - before

    embed_ms = median_ms(lambda i: embedder.embed([QUERIES[i % len(QUERIES)]]), args.repeats)
    nearest_ms, search_ms = asyncio.run(bench_search(embedder, args.entries, args.repeats))
    print(f"embedder {embedder.model_id} (CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores)")
    print(
        f"load + first embedding: {load_s:.2f} s; RSS added: {added:.0f} MiB "
        f"({'bare process' if args.bare else 'tiny pipeline loaded first, as in the bot'})"
    )
    print(f"embed one query: {embed_ms:.1f} ms (median of {args.repeats})")
    print(f"search {args.entries} entries of one server, vector given: {nearest_ms:.1f} ms (median)")
    print(f"/library query end to end (embed + search): {search_ms:.1f} ms (median)")


if __name__ == "__main__":
    main()
