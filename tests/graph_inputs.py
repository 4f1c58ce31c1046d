"""Which inputs a CUDA graph of a compiled function would copy on every replay, observed on the CPU."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Where AOTAutograd logs, per graph input, whether it is static (the `cudagraph_static_inputs` artifact).
_LOGGER = "torch._functorch._aot_autograd.frontend_utils"


@contextmanager
def copied_graph_inputs() -> Iterator[list[str]]:
    """Collects the dynamo sources (e.g. "L['pos']") of non-static inputs of graphs compiled inside.

    CUDA graphs (mode="reduce-overhead") read static inputs (parameters, tensors marked with
    mark_static_address) in place and copy every other tensor input into graph memory on each replay.
    Compile with an AOT backend (e.g. "aot_eager") so the inputs get classified.
    """
    copied: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Non-static input"):
                copied.append(message.rsplit("source ", 1)[-1])

    logger, handler = logging.getLogger(_LOGGER), Collect()
    torch._dynamo.reset()
    torch._logging.set_logs(cudagraph_static_inputs=True)
    logger.addHandler(handler)
    try:
        yield copied
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
