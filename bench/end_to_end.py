"""Benchmark: one whole /compose (caption -> refine -> generate -> join), ours vs transformers' loops.

    python -m bench.end_to_end --profile tiny --device cpu
    python -m bench.end_to_end --profile full-size --device cuda --seconds 30

Prints one JSON object. Both paths run the same `Pipeline.compose` on the same clip, seed and
stages; the reference path swaps the two hand-written decode loops for transformers' `generate`:
the refiner's grammar-constrained loop for `generate` with the same grammar as a logits processor, and the
MusicGen loop for `MusicgenMelodyForConditionalGeneration.generate` (bench/reference.py). The
captioner runs transformers' beam search in both. `full-size` builds the real architectures
(LP-MusicCaps on bart-base, Llama-3.2-3B, MusicGen-melody 1.5 B) with random weights and the tiny
offline tokenizers, so nothing is downloaded; speed does not depend on weight values, but random
weights make the captioner and the LLM run to their length bounds (a worst case). Each path is
warmed up with one 10 s compose first. Peak memory is torch.cuda.max_memory_allocated over the
whole run on CUDA (all three models resident), the process's peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.bench_refiner import ReplyLogitsProcessor, timed
from bench.reference import reference_codes
from mtm_bot.core.audio import Audio, load_clip
from mtm_bot.core.settings import Settings
from mtm_bot.stages.captioner import Captioner, LPMusicCaps, bart_base_config
from mtm_bot.stages.compiling import EAGER
from mtm_bot.stages.generator import Generator, build_tiny_musicgen
from mtm_bot.stages.pipeline import BLOCK_SECONDS, Pipeline
from mtm_bot.stages.refiner import Refiner
from mtm_bot.stages.runtime import model_dtype, resolve_device
from mtm_bot.stages.sampling import Sampling
from mtm_bot.stages.tiny import build_tiny_tokenizer

INSTRUCTION = "a cosy jazz carol with sleigh bells"


class TransformersRefiner(Refiner):
    """The refiner with its decode loop replaced by `generate` + its grammar as a logits processor."""

    def generate(self, prompt_ids, grammar, max_new_tokens, seed=0, cancel=None):
        processor = ReplyLogitsProcessor(grammar, self.vocab_size)  # single use
        torch.manual_seed(seed)
        out = self.model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            logits_processor=[processor],
            do_sample=self.temperature > 0,
            temperature=self.temperature or None,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids,
        )
        tokens = out[0, prompt_ids.shape[1] :].tolist()
        return tokens[:-1] if tokens and tokens[-1] in self.stop_token_ids else tokens


class TransformersDecoder:
    """MusicgenDecoder's interface over transformers' `generate` (no progress or cancel per step)."""

    def __init__(self, model) -> None:
        self.model = model

    def decode_blocks(self, blocks, sampling: Sampling = Sampling(), max_blocks: int = 1, admit=None) -> None:
        """The generator's batcher calls this: one block at a time, each handed to its `done` (transformers'
        generate cannot mix prompts and melodies in one batch, nor let a block join between steps)."""
        for r, done in blocks:
            done(
                reference_codes(
                    self.model,
                    input_ids=r.input_ids,
                    attention_mask=r.attention_mask,
                    input_features=r.input_features,
                    prompt_codes=r.prompt_codes,
                    new_frames=r.new_frames,
                    guidance_scale=sampling.guidance_scale,
                    greedy=sampling.greedy,
                    top_k=sampling.top_k,
                )
            )


def build_stages(profile: str, device: torch.device, max_batch: int = 1) -> tuple[Captioner, Refiner, Generator]:
    if profile == "tiny":
        return (
            Captioner.tiny(device),
            Refiner.load("tiny", "", device),
            Generator.load("tiny", "", device, BLOCK_SECONDS, max_batch=max_batch),
        )
    from bench.bench_musicgen import build_random_musicgen
    from bench.bench_refiner import build_random_llama_3b

    dtype = model_dtype(device)
    captioner = Captioner(LPMusicCaps(bart_base_config()), Captioner.tiny(torch.device("cpu")).tokenizer, device)
    tokenizer = build_tiny_tokenizer()
    refiner = Refiner(build_random_llama_3b(tokenizer, dtype, device), tokenizer, device)
    musicgen = build_random_musicgen("melody").to(device, dtype)
    musicgen.audio_encoder.float()
    generator = Generator(musicgen, build_tiny_musicgen("melody")[1], device, BLOCK_SECONDS, max_batch=max_batch)
    if device.type == "cuda":  # on the decode thread, where the graphs will replay
        generator.batcher.call(lambda: generator.decoder.warmup(max_batch=max_batch))
    return captioner, refiner, generator


def synth_clip(seconds: float) -> Audio:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from synth import music

    return Audio(music(seconds, rate=32000), 32000)


def run(pipeline: Pipeline, clip: Audio, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = pipeline.compose(clip, INSTRUCTION, seed=0)
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 3),
        "rtf": round(wall / result.audio.duration, 4),
        "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
        "output_s": result.audio.duration,
        "blocks": len(result.blocks),
    }


def concurrent(pipeline: Pipeline, clip: Audio, jobs: int, repeats: int = 3) -> dict:
    """`jobs` composes submitted at once, as the worker runs them: one at a time (today's queue with
    MTM_MAX_BATCH=1), then all together, their MusicGen blocks batched and their clips captioned in one
    batch. The two alternate `repeats` times; each keeps its fastest run (a shared machine is noisy)."""

    def one_at_a_time() -> None:
        for i in range(jobs):
            pipeline.compose(clip, INSTRUCTION, seed=i)

    def batched() -> None:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda i: pipeline.compose(clip, INSTRUCTION, seed=i), range(jobs)))

    batcher, captions = pipeline.generator.batcher, pipeline.captioner.batches
    walls: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
    for _ in range(repeats):
        walls["one_at_a_time"].append(timed(one_at_a_time)[1])
        loops, joined, caption_batches = len(batcher.batch_sizes), batcher.joined, len(captions.batch_sizes)
        walls["batched"].append(timed(batched)[1])
    report = {
        name: {
            "wall_s": round(min(runs), 2),
            "jobs_per_minute": round(60 * jobs / min(runs), 2),
            "runs_s": [round(r, 2) for r in runs],
        }
        for name, runs in walls.items()
    }
    loops_run = batcher.batch_sizes[loops:]  # of the last batched run
    report["batched"]["decode_loops"] = len(loops_run)
    report["batched"]["blocks_per_loop"] = round((sum(loops_run) + batcher.joined - joined) / len(loops_run), 2)
    report["batched"]["clips_per_caption_batch"] = captions.batch_sizes[caption_batches:]
    return {
        "jobs": jobs,
        "max_batch": batcher.max_batch,
        **report,
        "batch_speedup": round(report["batched"]["jobs_per_minute"] / report["one_at_a_time"]["jobs_per_minute"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length; the output is as long")
    parser.add_argument("--clip", type=Path, help="an audio file instead of the synthetic clip")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--jobs", type=int, default=0, help="also time this many concurrent jobs, batched vs one at a time (ours only)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    captioner, refiner, generator = build_stages(args.profile, device, max_batch=max(1, args.jobs))
    build_s = time.perf_counter() - start
    settings = Settings(profile="tiny", device=str(device))
    clip = load_clip(args.clip, max_seconds=600) if args.clip else synth_clip(args.seconds)
    warm = Audio(clip.samples[: 10 * clip.sample_rate], clip.sample_rate)

    # The two paths share every model; the generator's decode loop is swapped in place per path.
    paths = {"ours": (Pipeline(settings, captioner=captioner, refiner=refiner, generator=generator), generator.decoder)}
    if not args.skip_reference:
        reference_refiner = TransformersRefiner(refiner.model, refiner.tokenizer, device, compile=EAGER)
        paths["transformers"] = (
            Pipeline(settings, captioner=captioner, refiner=reference_refiner, generator=generator),
            TransformersDecoder(generator.model),
        )
    for pipeline, decoder in paths.values():
        generator.decoder = decoder
        pipeline.compose(warm, INSTRUCTION, seed=0)

    result = {
        "profile": args.profile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "clip_s": round(clip.duration, 2),
        "build_s": round(build_s, 1),
    }
    for name, (pipeline, decoder) in paths.items():
        generator.decoder = decoder
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result[name] = run(pipeline, clip, device)
        if device.type == "cuda":  # all three models resident, plus this path's working memory
            result[name]["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if "transformers" in result:
        result["speedup"] = round(result["transformers"]["wall_s"] / result["ours"]["wall_s"], 2)
    if args.jobs > 1:
        generator.decoder = paths["ours"][1]
        result["concurrent"] = concurrent(paths["ours"][0], clip, args.jobs)
    if device.type == "cpu":
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
