"""Every GPU benchmark in one command, into one JSON report: for whoever has a GPU for ten minutes.

    python -m bench.gpu_suite [--out gpu_report.json]           # or `make bench-gpu`
    python -m bench.gpu_suite --only musicgen_melody refiner     # a rerun of some of them
    python -m bench.gpu_suite --device cpu --smoke               # tiny models on the CPU: checks the suite
    python -m bench.gpu_suite --only musicgen_stereo_melody musicgen_melody_large musicgen_stereo_melody_large

Runs MusicGen-melody and MusicGen-small (one 10 s block each), a continuation (MusicGen-small from a
5 s prompt), the refiner (Llama-3.2-3B), the captioner (LP-MusicCaps on bart-base) and the whole
/compose, all at full size with random weights (nothing is downloaded), each in its own process
with its own time limit: a bench that fails or runs out of time is recorded as such, and the others'
numbers are kept. Each bench times the transformers reference beside our path (see its docstring).
The report holds the card, the versions of torch, CUDA, transformers and xgrammar, each bench's JSON,
its command and wall time, and the suite's wall time; it is rewritten after every bench, so a suite
stopped early keeps what it measured. The time limits add up to under 8 minutes. The other
checkpoints MTM_MUSICGEN_ID may name (stereo, large) have benches of their own, run with --only
(about 5 more minutes together).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    args: tuple[str, ...]  # full size, on the GPU
    smoke_args: tuple[str, ...]  # tiny, on the CPU: seconds, not minutes
    timeout_s: int


BENCHES = (
    # Batch 4: the same run times four blocks one at a time and in one batched loop (batch_speedup).
    Bench(
        "musicgen_melody",
        "bench.bench_musicgen",
        ("--arch", "melody", "--seconds", "10", "--repeats", "2", "--batch", "4"),
        ("--arch", "tiny", "--seconds", "1", "--repeats", "1", "--batch", "2"),
        120,
    ),
    Bench(
        "musicgen_small",
        "bench.bench_musicgen",
        ("--arch", "small", "--seconds", "10", "--repeats", "2"),
        ("--arch", "tiny", "--seconds", "1", "--repeats", "1"),
        50,
    ),
    Bench(
        "musicgen_small_continuation",
        "bench.bench_musicgen",
        ("--arch", "small", "--seconds", "10", "--prompt-seconds", "5", "--repeats", "2"),
        ("--arch", "tiny", "--seconds", "1", "--prompt-seconds", "1", "--repeats", "1"),
        40,
    ),
    Bench(
        "refiner",
        "bench.bench_refiner",
        ("--profile", "full-size", "--repeats", "2"),
        ("--profile", "tiny", "--repeats", "1"),
        70,
    ),
    Bench(
        "captioner",
        "bench.bench_captioner",
        ("--profile", "full-size", "--seconds", "30", "--repeats", "2"),
        ("--profile", "tiny", "--seconds", "10", "--repeats", "1"),
        40,
    ),
    # Four concurrent jobs too: jobs per minute one at a time vs batched.
    Bench(
        "compose",
        "bench.end_to_end",
        ("--profile", "full-size", "--seconds", "20", "--jobs", "4"),
        ("--profile", "tiny", "--seconds", "10", "--jobs", "2"),
        150,
    ),
)
SUITE_LIMIT_S = 8 * 60  # the time limits above add up to less
# One 10 s block of each other melody checkpoint, batch 4 as the default's: run with --only.
CHECKPOINT_BENCHES = tuple(
    Bench(
        f"musicgen_{arch.replace('-', '_')}",
        "bench.bench_musicgen",
        ("--arch", arch, "--seconds", "10", "--repeats", "2", "--batch", "4"),
        ("--arch", "tiny-stereo" if "stereo" in arch else "tiny", "--seconds", "1", "--repeats", "1"),
        timeout,
    )
    for arch, timeout in (("stereo-melody", 90), ("melody-large", 110), ("stereo-melody-large", 110))
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_report.json"), help="the report (JSON)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and short runs: checks the suite itself")
    parser.add_argument(
        "--only", nargs="+", choices=[b.name for b in BENCHES + CHECKPOINT_BENCHES], help="run only these benches"
    )
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"No CUDA device is available (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
            f"the GPU suite needs one. `--device cpu --smoke` checks the suite itself on the CPU.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.smoke:
        print("The full-size benches on the CPU would take hours; add --smoke for tiny models.", file=sys.stderr)
        return 2

    benches = [b for b in BENCHES + CHECKPOINT_BENCHES if b.name in args.only] if args.only else list(BENCHES)
    started = time.monotonic()
    report = {
        "machine": machine(args.device),
        "smoke": args.smoke,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": 0.0,
        "benches": {},
    }
    for bench in benches:
        print(f"{bench.name} ...", file=sys.stderr, flush=True)
        report["benches"][bench.name] = entry = run(bench, args.device, args.smoke)
        report["wall_s"] = round(time.monotonic() - started, 1)
        write(report, args.out)
        print(
            f"{bench.name}: {'ok' if entry['ok'] else entry['error']} ({entry['wall_s']} s)",
            file=sys.stderr,
            flush=True,
        )
    failed = [name for name, entry in report["benches"].items() if not entry["ok"]]
    print(
        f"wrote {args.out} ({report['wall_s']} s; {len(benches) - len(failed)} of {len(benches)} benches ok"
        f"{': failed ' + ', '.join(failed) if failed else ''})",
        file=sys.stderr,
    )
    return 1 if failed else 0


def machine(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for package in ("transformers", "xgrammar", "huggingface_hub"):
        info[package] = importlib.metadata.version(package)
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info |= {
            "gpu": torch.cuda.get_device_name(index),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def run(bench: Bench, device: str, smoke: bool) -> dict:
    """One bench in its own process; its JSON, or why there is none."""
    command = [sys.executable, "-m", bench.module, *(bench.smoke_args if smoke else bench.args), "--device", device]
    entry: dict = {"command": " ".join(command[1:]), "timeout_s": bench.timeout_s}
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=bench.timeout_s, cwd=Path(__file__).resolve().parent.parent
        )
    except subprocess.TimeoutExpired as err:
        entry |= {"ok": False, "error": f"timed out after {bench.timeout_s} s", "stderr_tail": _tail(err.stderr)}
    else:
        result = _last_json_object(done.stdout)
        if done.returncode == 0 and result is not None:
            entry |= {"ok": True, "result": result}
        else:
            entry |= {
                "ok": False,
                "error": f"exit code {done.returncode}" if done.returncode else "no JSON on stdout",
                "stderr_tail": _tail(done.stderr),
            }
    entry["wall_s"] = round(time.monotonic() - started, 1)
    return entry


def _last_json_object(stdout: str) -> dict | None:
    """The JSON object a bench prints last (indented: its opening brace starts a line)."""
    start = stdout.rfind("\n{") + 1  # 0 when the object is all there is
    try:
        value = json.loads(stdout[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tail(text: str | bytes | None, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def write(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
