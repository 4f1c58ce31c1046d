"""Benchmark: what a second, third and fourth take of one request add, generated together in the batched decode.

    python -m bench.takes --profile tiny --device cpu [--seconds 20] [--repeats 1] [--max-takes 4]

Takes share the request's captioning and refinement; each take is the same blocks from another seed. For
N takes the script times, in the same run: one compose (caption + refine + generate), a compose of N takes
(`Pipeline.compose(takes=N)`, as the bot runs it: its takes' blocks meet in the batched decode) and N
generations one after another. It prints one JSON object: per N, the request of N takes, N separate
requests (N times one compose), the generation one after another, and what each take beyond the first
adds, as a share of one request. Run it on an otherwise idle machine with --repeats 3.
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


def blocks_sharing_loops(batcher, loops_before: int, joined_before: int) -> int:
    """Blocks that shared a decode loop with another take's since then (started together, or joined)."""
    return sum(size for size in batcher.batch_sizes[loops_before:] if size > 1) + batcher.joined - joined_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=int, default=20, help="clip and track length")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-takes", type=int, default=4)
    args = parser.parse_args()

    device = resolve_device(args.device)
    captioner, refiner, generator = build_stages(args.profile, device, max_batch=args.max_takes)
    pipeline = Pipeline(
        Settings(profile="tiny", device=str(device)), captioner=captioner, refiner=refiner, generator=generator
    )
    clip = synth_clip(args.seconds)
    composed, compose_s = best_of(args.repeats, lambda: pipeline.compose(clip, INSTRUCTION, args.seconds, seed=1))
    blocks = composed.blocks
    _, one_take_s = best_of(args.repeats, lambda: generator.generate(clip, blocks, seed=1))
    # Captioning and refinement, as the compose timed them: once per request, whatever its takes.
    shared_s = composed.timings["caption"] + composed.timings["refine"]
    one_request_s = shared_s + one_take_s
    report = {
        "profile": args.profile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "compose_s": round(compose_s, 3),
        "caption_and_refine_s": round(shared_s, 3),
        "generate_one_take_s": round(one_take_s, 3),
        "takes": {},
    }
    batcher = generator.batcher
    for takes in range(2, args.max_takes + 1):
        seeds = list(range(1, takes + 1))
        shared: list[int] = []

        def request(takes: int = takes, shared: list[int] = shared) -> None:
            loops_before, joined_before = len(batcher.batch_sizes), batcher.joined
            pipeline.compose(clip, INSTRUCTION, args.seconds, seed=1, takes=takes)
            shared.append(blocks_sharing_loops(batcher, loops_before, joined_before))

        _, request_s = best_of(args.repeats, request)
        _, sequential_s = best_of(args.repeats, lambda: [generator.generate(clip, blocks, seed=s) for s in seeds])
        report["takes"][takes] = {
            "request_s": round(request_s, 3),
            "separate_requests_s": round(takes * one_request_s, 3),
            "generate_one_after_another_s": round(sequential_s, 3),
            "blocks_sharing_a_decode_loop": min(shared),
            "blocks": takes * len(blocks),
            "each_extra_take_adds": f"{100 * (request_s - compose_s) / (takes - 1) / compose_s:.0f}% of one request",
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
