"""Resident memory of this process, for the benchmarks that report what loading a model adds.

Imports nothing heavy, so a bench can read it before torch or transformers are imported.
"""

from __future__ import annotations

import os
from pathlib import Path


def resident_mib() -> float:
    """This process's resident set size now (Linux), in MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
