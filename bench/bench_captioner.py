"""Benchmark: the captioner with all segments in one batch vs one segment at a time, in the same run.

    python -m bench.bench_captioner --profile tiny --device cpu --seconds 30
    python -m bench.bench_captioner --profile full-size --device cuda --seconds 60

Prints one JSON object. One segment at a time is how the reference LP-MusicCaps script captions a
clip; the bot sends every segment through the front end, encoder and beam search as one batch.
`full-size` is LP-MusicCaps' architecture (bart-base) with random weights and the tiny offline
tokenizer: random weights never stop early, so beam search runs to its 128-token bound (a worst
case for both paths alike).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.bench_musicgen import timed
from bench.end_to_end import synth_clip
from mtm_bot.core.audio import Audio
from mtm_bot.stages.captioner import SEGMENT_SECONDS, Captioner, LPMusicCaps, bart_base_config
from mtm_bot.stages.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    tiny = Captioner.tiny(device)
    captioner = tiny if args.profile == "tiny" else Captioner(LPMusicCaps(bart_base_config()), tiny.tokenizer, device)
    clip = synth_clip(args.seconds)
    rate = clip.sample_rate
    pieces = [
        Audio(clip.samples[i * rate * SEGMENT_SECONDS : (i + 1) * rate * SEGMENT_SECONDS], rate)
        for i in range(-(-len(clip.samples) // (rate * SEGMENT_SECONDS)))
    ]
    paths = {
        "batched": lambda: captioner.caption(clip),
        "one_at_a_time": lambda: [captioner.caption(piece) for piece in pieces],
    }
    for run in paths.values():
        run()  # warm-up
    times = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both alike
        for name, run in paths.items():
            times[name].append(timed(run, device)[0])  # (wall, memory)
    result = {
        "profile": args.profile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "clip_s": args.seconds,
        "segments": len(pieces),
    }
    for name, measured in times.items():
        wall = statistics.median(measured)
        result[name] = {"wall_s": round(wall, 3), "rtf": round(wall / args.seconds, 4)}
    result["speedup"] = round(result["one_at_a_time"]["wall_s"] / result["batched"]["wall_s"], 2)
    if device.type == "cuda":
        result["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
