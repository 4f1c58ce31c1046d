"""bench/gpu_suite.py on the CPU: its report, a bench that fails or hangs, and no GPU.

The whole smoke suite takes minutes on two cores, so the report is checked with one tiny bench run for
real; the suite runs every bench the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_suite

ROOT = Path(__file__).resolve().parent.parent


def suite(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_report_holds_the_machine_the_versions_and_each_bench_with_its_reference(tmp_path):
    out = tmp_path / "report.json"
    done = suite("--device", "cpu", "--smoke", "--only", "musicgen_small", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert machine["transformers"] and machine["xgrammar"]
    assert report["smoke"] is True and report["wall_s"] > 0
    entry = report["benches"]["musicgen_small"]
    assert entry["ok"] and "bench.bench_musicgen" in entry["command"]
    result = entry["result"]
    assert result["fast"]["wall_s"] > 0 and result["transformers"]["wall_s"] > 0  # ours and the reference
    assert f"wrote {out}" in done.stderr


def test_a_failing_silent_or_hanging_bench_is_recorded_as_such(tmp_path, monkeypatch):
    (tmp_path / "crashing_bench.py").write_text("raise RuntimeError('CUDA out of memory')\n")
    (tmp_path / "silent_bench.py").write_text("print('no JSON here')\n")
    (tmp_path / "hanging_bench.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    crashed = gpu_suite.run(gpu_suite.Bench("crashing", "crashing_bench", (), (), 60), "cpu", smoke=False)
    assert not crashed["ok"] and crashed["error"] == "exit code 1" and "CUDA out of memory" in crashed["stderr_tail"]
    silent = gpu_suite.run(gpu_suite.Bench("silent", "silent_bench", (), (), 60), "cpu", smoke=False)
    assert not silent["ok"] and silent["error"] == "no JSON on stdout"
    hung = gpu_suite.run(gpu_suite.Bench("hanging", "hanging_bench", (), (), 2), "cpu", smoke=False)
    assert not hung["ok"] and hung["error"] == "timed out after 2 s" and hung["wall_s"] < 30


def test_the_time_limits_fit_in_eight_minutes():
    assert sum(b.timeout_s for b in gpu_suite.BENCHES) < gpu_suite.SUITE_LIMIT_S == 480
    names = {b.name for b in gpu_suite.BENCHES}
    assert names == {
        "musicgen_melody",
        "musicgen_small",
        "musicgen_small_continuation",
        "refiner",
        "captioner",
        "compose",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_the_suite_stops_at_once_with_a_sentence(tmp_path):
    done = suite("--out", str(tmp_path / "report.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert "No CUDA device is available" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "report.json").exists()
