"""Prometheus metrics (prometheus-client) of the bot and of each GPU worker, served over HTTP on
settings.metrics_port when it is set (off by default).

    mtm_queue_length                      jobs waiting for a GPU slot (bot)
    mtm_jobs{state="queued"|"running"}    unfinished jobs (bot)
    mtm_jobs_finished_total{state}        done, failed, cancelled (bot)
    mtm_live_workers                      GPU workers with a fresh heartbeat (bot, distributed mode)
    mtm_stage_seconds{stage}              seconds per pipeline stage (where jobs run)
    mtm_gpu_memory_bytes                  memory torch holds on the GPU (where jobs run)
"""

from __future__ import annotations

import logging
import sys

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

QUEUE_LENGTH = Gauge("mtm_queue_length", "Jobs waiting for a GPU slot")
JOBS = Gauge("mtm_jobs", "Unfinished jobs by state", ["state"])
JOBS_FINISHED = Counter("mtm_jobs_finished", "Finished jobs by state", ["state"])
LIVE_WORKERS = Gauge("mtm_live_workers", "GPU workers with a fresh heartbeat")
STAGE_SECONDS = Histogram(
    "mtm_stage_seconds",
    "Seconds per pipeline stage",
    ["stage"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
GPU_MEMORY = Gauge("mtm_gpu_memory_bytes", "GPU memory held by torch in this process")


def _gpu_memory() -> float:
    torch = sys.modules.get("torch")  # never import torch for a metric: the bot may run without it
    if torch is None or not torch.cuda.is_available():
        return 0.0
    return float(torch.cuda.memory_allocated())


GPU_MEMORY.set_function(_gpu_memory)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` (a thread of this process); 0 leaves it off."""
    if port:
        start_http_server(port, addr=address)
        log.info("Prometheus metrics on http://%s:%d/metrics", address, port)
