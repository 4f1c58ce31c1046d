"""Benchmark: what building on a kept track saves, against a fresh /compose of the same clip, same run.

    python -m bench.derived --profile tiny --device cpu [--seconds 30] [--repeats 3]

Prints one JSON object: the best wall time of each path over `--repeats` runs (after one warm-up run
each), and how much shorter
Reroll (no captioning, no LLM) and Remix (no captioning) are than a fresh compose of the same clip and
length. Extend and Redo generate a different amount of music, so they are reported per second of new
music beside compose's. `full-size` is bench.end_to_end's random-weight build of the real architectures.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.bench_refiner import best_of
from bench.end_to_end import INSTRUCTION, build_stages, synth_clip
from mtm_bot.core.settings import Settings
from mtm_bot.stages.pipeline import Pipeline
from mtm_bot.stages.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=int, default=30, help="clip and track length")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    captioner, refiner, generator = build_stages(args.profile, device)
    pipeline = Pipeline(
        Settings(profile="tiny", device=str(device)), captioner=captioner, refiner=refiner, generator=generator
    )
    clip = synth_clip(args.seconds)
    composed, compose_s = best_of(args.repeats, lambda: pipeline.compose(clip, INSTRUCTION, args.seconds, seed=1))
    kept = composed.kept(INSTRUCTION, clip)
    paths = {
        "reroll": lambda: pipeline.reroll(kept, seed=2),
        "remix": lambda: pipeline.remix(kept, "a heavy metal anthem", seed=2),
        "extend_10s": lambda: pipeline.extend(kept, 10, seed=2),
        "redo_last_block": lambda: pipeline.redo(kept, kept.blocks[-1].start, seed=2),
    }
    report = {
        "profile": args.profile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "compose_s": round(compose_s, 3),
        "compose_stages_s": {k: round(v, 3) for k, v in composed.timings.items()},
    }
    for name, run in paths.items():
        _, wall = best_of(args.repeats, run)
        report[f"{name}_s"] = round(wall, 3)
    for name in ("reroll", "remix"):
        report[f"{name}_saves"] = f"{100 * (1 - report[f'{name}_s'] / compose_s):.0f}%"
    report["compose_s_per_new_second"] = round(compose_s / args.seconds, 3)
    report["extend_s_per_new_second"] = round(report["extend_10s_s"] / 10, 3)
    report["redo_s_per_new_second"] = round(report["redo_last_block_s"] / (args.seconds - kept.blocks[-1].start), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
