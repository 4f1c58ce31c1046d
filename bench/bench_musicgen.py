"""Benchmark: transformers' MusicGen `generate` vs the fast decode loop, timed in the same run.

    python -m bench.bench_musicgen --arch small --seconds 10 --prompt-seconds 0 --device cuda
    python -m bench.bench_musicgen --arch tiny --device cpu --threads 1 --batch 4
    python -m bench.bench_musicgen --arch stereo-melody-large --seconds 10 --device cuda

Prints one JSON object. Full-size architectures (musicgen-small, musicgen-melody, melody-large and
the stereo ones) are built from their published configs with random weights, so nothing is
downloaded; the timing of a decoder does not depend on its weights. `tiny` and `tiny-stereo` are the
test profile's layouts. `--batch N` decodes N blocks (each its own description, seed and
generator) three ways: `fast`, all N in one batched loop (generate_batch, as the bot batches jobs);
`fast_one_at_a_time`, the same N blocks one after another; `transformers`, its `generate` over the
N rows. All do the same work: CFG 3, top-k 250 sampling, the same number of decode steps; none
decodes audio with EnCodec. Each path is warmed up, then timed `--repeats` times, interleaved;
wall times are medians. `s_per_block_per_sequence` is wall time / N; `rtf` is wall time / audio
time (below 1 is faster than real time); `batch_speedup` is one-at-a-time wall time / batched wall
time, `speedup` transformers' / batched. Peak memory: torch.cuda.max_memory_allocated per path on
CUDA; on the CPU the process's peak RSS so far (the fast paths run first).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import torch

from bench.reference import reference_codes
from mtm_bot.stages.generator import FRAME_RATE, cache_frames
from mtm_bot.stages.musicgen_decode import BlockRequest, MusicgenDecoder
from mtm_bot.stages.pipeline import BLOCK_SECONDS

CHROMA_RATE = 32000 / 4096  # musicgen-melody chroma frames per second (hop 4096)
TEXT_TOKENS = 24  # a typical refined caption


def build_random_musicgen(arch: str):
    """musicgen-small / musicgen-melody with their hub configs written out, randomly initialised."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
        T5Config,
    )

    t5_base = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"
    )
    encodec_32khz = EncodecConfig(
        sampling_rate=32000,
        audio_channels=1,
        codebook_size=2048,
        target_bandwidths=[2.2],
        upsampling_ratios=[8, 5, 4, 4],
        hidden_size=128,
        num_filters=64,
        num_residual_layers=1,
        num_lstm_layers=2,
        norm_type="weight_norm",
        normalize=False,
        use_causal_conv=False,
        codebook_dim=128,
        compress=2,
    )
    if arch == "small":
        decoder = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096)
    elif arch.endswith("large"):
        decoder = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, ffn_dim=8192)
    else:
        decoder = dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144)
    stereo = arch.startswith("stereo")
    decoder.update(
        vocab_size=2048,
        num_codebooks=8 if stereo else 4,
        audio_channels=2 if stereo else 1,
        max_position_embeddings=2048,
        pad_token_id=2048,
        bos_token_id=2048,
        activation_function="gelu",
        dropout=0.1,
    )
    if arch == "small":
        model = MusicgenForConditionalGeneration(
            MusicgenConfig(text_encoder=t5_base, audio_encoder=encodec_32khz, decoder=MusicgenDecoderConfig(**decoder))
        )
    else:
        model = MusicgenMelodyForConditionalGeneration(
            MusicgenMelodyConfig(
                text_encoder=t5_base,
                audio_encoder=encodec_32khz,
                decoder=MusicgenMelodyDecoderConfig(**decoder),
                num_chroma=12,
                chroma_length=235,
            )
        )
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = 2048
    gen.do_sample, gen.top_k, gen.guidance_scale, gen.max_length = True, 250, 3.0, 1500
    return model.eval()


def build(arch: str, device: torch.device, dtype: torch.dtype):
    if arch.startswith("tiny"):
        from mtm_bot.stages.generator import build_tiny_musicgen

        model, _ = build_tiny_musicgen("melody", stereo=arch == "tiny-stereo")
    else:
        model = build_random_musicgen(arch)
    return model.to(device=device, dtype=dtype)


def bench_inputs(model, batch: int, seconds: float, prompt_seconds: float, device: torch.device) -> dict:
    rng = torch.Generator().manual_seed(0)
    vocab = model.config.text_encoder.vocab_size
    kw = dict(
        input_ids=torch.randint(3, vocab, (batch, TEXT_TOKENS), generator=rng).to(device),
        attention_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=device),
    )
    if hasattr(model.config, "chroma_length"):  # melody: a chroma of the block's length
        notes = torch.randint(0, 12, (batch, math.ceil(seconds * CHROMA_RATE)), generator=rng)
        kw["input_features"] = torch.nn.functional.one_hot(notes, 12).to(device, model.dtype)
    prompt_frames = round(prompt_seconds * FRAME_RATE)
    if prompt_frames:
        codebook_size = model.decoder.config.vocab_size
        codebooks = model.decoder.num_codebooks
        kw["prompt_codes"] = torch.randint(0, codebook_size, (batch, codebooks, prompt_frames), generator=rng).to(
            device
        )
    return kw


def block_requests(kw: dict, frames: int, device: torch.device) -> list[BlockRequest]:
    """The rows of `kw` as separate blocks, each with its own generator (as jobs are batched)."""

    def row(name: str, i: int):
        return None if kw.get(name) is None else kw[name][i : i + 1]

    return [
        BlockRequest(
            row("input_ids", i),
            row("attention_mask", i),
            frames,
            row("input_features", i),
            row("prompt_codes", i),
            torch.Generator(device).manual_seed(i),
        )
        for i in range(kw["input_ids"].shape[0])
    ]


def gemms_per_step(decoder: MusicgenDecoder, kw: dict) -> int:
    """Matrix products one eager decode step runs: a count of the step's largest kernels that holds
    on any device (torch.compile fuses elementwise work around them, not the products themselves)."""
    from torch.profiler import ProfilerActivity, profile

    def gemms(frames: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decoder.generate_batch(block_requests(kw, frames, decoder.device))
        return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm"))

    compiled_step, decoder.step = decoder.step, decoder.decode_one_token
    try:
        return gemms(3) - gemms(2)
    finally:
        decoder.step = compiled_step


def captured_step_reads(decoder: MusicgenDecoder) -> dict:
    """MiB a captured step of the last batch's bucket must read: the decoder's weights (but the token
    embeddings, of which it reads 4 rows per row, and the cross-attention K/V projections, applied once
    per block) and every slot of the bucket's caches (a CUDA graph has one shape, so it reads the empty
    ones too). With the step time, this gives the memory bandwidth the step achieves."""
    net = decoder.net
    unread = [*net.stack.embed_tokens.parameters()]
    if not net.prefix_conditioning:
        unread += [
            p
            for layer in net.stack.layers
            for p in (layer.encoder_attn.k_proj.weight, layer.encoder_attn.v_proj.weight)
        ]
    unread_ids = {id(p) for p in unread}
    weights = sum(p.nbytes for p in decoder.model.decoder.parameters() if id(p) not in unread_ids)
    assert decoder.batch is not None
    caches = [
        t
        for t in (
            decoder.batch.caches.k,
            decoder.batch.caches.v,
            decoder.batch.caches.cross_k,
            decoder.batch.caches.cross_v,
        )
        if t is not None
    ]
    return {"weights_mib": round(weights / 2**20, 1), "kv_cache_mib": round(sum(t.nbytes for t in caches) / 2**20, 1)}


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, peak memory MiB) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    if device.type == "cuda":
        return wall, torch.cuda.max_memory_allocated(device) / 2**20
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch",
        choices=["tiny", "tiny-stereo", "small", "melody", "melody-large", "stereo-melody", "stereo-melody-large"],
        default="tiny",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="new audio per block")
    parser.add_argument("--prompt-seconds", type=float, default=0.0, help="audio prompt continued from")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument(
        "--max-frames",
        type=int,
        default=0,
        help="KV cache size of the fast path; 0: the bot's (a 10 s block and its prompt), "
        "or the benched block if that is longer",
    )
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    start = time.perf_counter()
    model = build(args.arch, device, dtype)
    build_s = time.perf_counter() - start
    new_frames = round(args.seconds * FRAME_RATE)
    steps = new_frames + (model.decoder.num_codebooks // model.decoder.config.audio_channels) - 1
    kw = bench_inputs(model, args.batch, args.seconds, args.prompt_seconds, device)
    audio_seconds = args.batch * new_frames / FRAME_RATE

    def report(wall: float, memory: float, loop_steps: int) -> dict:
        return {
            "wall_s": round(wall, 3),
            "s_per_block_per_sequence": round(wall / args.batch, 3),
            "steps_per_s": round(loop_steps / wall, 2),
            "rtf": round(wall / audio_seconds, 4),
            "peak_memory_mib": round(memory, 1),
        }

    compile = {"auto": None, "on": True, "off": False}[args.compile]
    max_frames = args.max_frames or max(
        cache_frames(BLOCK_SECONDS), new_frames + round(args.prompt_seconds * FRAME_RATE)
    )
    decoder = MusicgenDecoder(model, max_frames=max_frames, compile=compile)
    start = time.perf_counter()
    decoder.warmup(max_batch=args.batch)  # buffers sized as the bot sizes them
    warmup_s = time.perf_counter() - start

    def run_fast(frames: int) -> None:
        decoder.generate_batch(block_requests(kw, frames, device))

    def run_one_at_a_time(frames: int) -> None:
        for block in block_requests(kw, frames, device):
            decoder.generate_batch([block])

    def run_reference(frames: int) -> None:
        reference_codes(model, **kw, new_frames=frames, greedy=False, top_k=250, guidance_scale=3.0)

    paths = {"fast": run_fast, "fast_one_at_a_time": run_one_at_a_time}
    if not args.skip_reference:
        paths["transformers"] = run_reference
    for run in paths.values():
        run(2)  # warm: lazy initialisation and first-touch memory are not decode speed
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows all paths alike
        for name, run in paths.items():
            runs[name].append(timed(lambda: run(new_frames), device))
    result = {
        "arch": args.arch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "batch": args.batch,
        "seconds": args.seconds,
        "prompt_seconds": args.prompt_seconds,
        "steps": steps,
        "repeats": args.repeats,
        "build_s": round(build_s, 1),
        "compiled": decoder.compiled,
        "max_frames": max_frames,
    }
    for name, measured in runs.items():
        loop_steps = steps * (args.batch if name == "fast_one_at_a_time" else 1)  # decode-loop steps it ran
        result[name] = report(statistics.median(w for w, _ in measured), max(m for _, m in measured), loop_steps)
    result["fast"]["warmup_s"] = round(warmup_s, 2)
    result["fast"]["gemms_per_step"] = gemms_per_step(decoder, kw)  # runs the batch last: its bucket is read
    reads = captured_step_reads(decoder)
    result["fast"]["captured_step_reads"] = reads
    if decoder.compiled:  # an eager step reads only the filled cache slots
        step_s = result["fast"]["wall_s"] / steps
        result["fast"]["achieved_gb_per_s"] = round(sum(reads.values()) * 2**20 / step_s / 1e9, 1)
    result["batch_speedup"] = round(result["fast_one_at_a_time"]["wall_s"] / result["fast"]["wall_s"], 2)
    if "transformers" in result:
        result["speedup"] = round(result["transformers"]["wall_s"] / result["fast"]["wall_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
