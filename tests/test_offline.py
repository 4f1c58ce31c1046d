"""No network: `download` and the full profile say so in one sentence within seconds, and ask the hub once.

The commands run as users run them, without HF_HUB_OFFLINE, with an empty Hugging Face cache and
HF_ENDPOINT pointed at a local port, so they can never reach the real hub. huggingface_hub alone would
retry each file five times with backoff (half a minute per file) and end in a traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from synth import write_music

ROOT = Path(__file__).resolve().parent.parent


class HangingUpHub:
    """A local "hub" that accepts each connection and closes it without a word; it counts the connections."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def hanging_up_hub() -> Iterator[HangingUpHub]:
    hub = HangingUpHub()
    yield hub
    hub.close()


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A port that takes connections (the kernel's backlog) and never answers: a hub that times out."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def refused_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # closed again: connecting there is refused


def run(args: list[str], endpoint: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN") and not k.startswith("MTM_")
    }
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mtm_bot", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    return done, time.monotonic() - started


def assert_one_sentence(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, done.stderr
    for fragment in fragments:
        assert fragment in error[0], done.stderr


@pytest.mark.parametrize(
    "where, reason",
    [
        ("refused", "(Connection refused)"),
        ("unresolvable", "http://hub.invalid cannot be reached ("),  # .invalid never resolves (RFC 2606)
    ],
)
def test_download_without_network_says_so_at_once(where, reason, tmp_path):
    endpoint = refused_endpoint() if where == "refused" else "http://hub.invalid"
    done, seconds = run(["download"], endpoint, tmp_path)
    assert_one_sentence(done, "Cannot download the checkpoints", reason, "needs network access")
    assert seconds < 15, f"{seconds:.1f} s"  # a hang guard; huggingface_hub's retries alone take 25 s


def test_download_from_a_hub_that_never_answers_gives_up_after_the_probe_timeout(silent_hub, tmp_path):
    done, seconds = run(["download"], silent_hub, tmp_path)
    assert_one_sentence(done, "Cannot download the checkpoints", "(no answer within 3 s)")
    assert seconds < 15, f"{seconds:.1f} s"


def test_download_asks_a_hub_that_hangs_up_once(hanging_up_hub, tmp_path):
    done, _ = run(["download"], hanging_up_hub.url, tmp_path)
    assert_one_sentence(done, f"{hanging_up_hub.url} cannot be reached")
    assert hanging_up_hub.connections == 1


def test_full_profile_without_weights_or_network_names_the_repo_and_asks_the_hub_once(hanging_up_hub, tmp_path):
    clip = write_music(tmp_path / "clip.wav", 3.0)
    done, seconds = run(
        ["compose", str(clip), "-i", "a cosy carol", "-o", str(tmp_path / "out.wav"), "--profile", "full"],
        hanging_up_hub.url,
        tmp_path,
    )
    assert_one_sentence(
        done, "seungheondoh/lp-music-caps", f"{hanging_up_hub.url} cannot be reached", "python -m mtm_bot download"
    )
    assert hanging_up_hub.connections == 1  # the probe; no load tried the network after it
    assert not (tmp_path / "out.wav").exists()
    assert seconds < 120, f"{seconds:.1f} s"  # a hang guard only: importing torch and transformers dominates here
