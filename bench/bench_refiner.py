"""Benchmark: the refiner's grammars (preparation, start-up, first and warm requests) and its own decode
loop vs transformers' `generate`, timed in the same run.

    python -m bench.bench_refiner --profile tiny --device cpu
    python -m bench.bench_refiner --profile full-size --device cuda --dtype bfloat16

Prints one JSON object. `full-size` is the Llama-3.2-3B-Instruct architecture (its hub config written
out) with random weights, so nothing is downloaded; decode speed does not depend on the weights. The
tokenizer (--vocab) is Llama 3.2's own by default (128,256 tokens, its special and stop tokens; see
bench/llama3_vocab.py), so grammar cost is the real one; `--vocab tiny` is the tests' 512-token one.

Grammars: the reply grammar's compile time per segment count now (string lengths left to the decode
mask, no time ranges) and before (bounded string patterns, the time ranges as constants: one grammar per
clip length), the refiner's start-up (tokenizer info, length masks, every grammar up to --max-segments),
the first and a warm request for 1, 3 and 6 segments, and the time to fill one token's mask.

Five runs on the same prompt (a real refine request, 3 segments), all greedy:
- ours / grammar: the product path, decoding until the JSON is complete; text the grammar forces
  (keys, punctuation) goes through the model in one pass per run (jump-forward);
- ours / grammar, step by step: the same with jump-forward off, one forward pass per token;
- transformers / grammar: `generate` with the same grammar and length mask as a logits processor
  (dynamic cache, eager);
- ours / free and transformers / free: no grammar, exactly --tokens new tokens (stop tokens ignored;
  by default as many as the stepwise grammar run's reply, so those runs are directly comparable). Our
  loop keeps one static KV cache for all runs, sized by the grammar run's schema bound.
tokens_per_s counts new tokens over the whole call, prefill included; forward_passes counts the passes
after the prompt's. The grammar overhead is our stepwise loop's ms per token with the mask vs without
it. The stepwise loop is also checked against `generate`: with greedy decoding both must produce the
same reply (jump-forward may tokenize forced text differently, so its reply is checked for validity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch
import xgrammar as xgr
from transformers import LogitsProcessor

import mtm_bot.stages.refiner
from mtm_bot.core.timecode import format_time
from mtm_bot.stages.captioner import Segment
from mtm_bot.stages.grammar import ReplyGrammar, ReplyMatcher, StringBudget, tokenizer_info
from mtm_bot.stages.refiner import Refiner
from mtm_bot.stages.refiner_prompt import JSON_SEPARATORS, max_output_tokens, refinement_schema, reply_schema
from mtm_bot.stages.runtime import model_dtype, resolve_device
from mtm_bot.stages.tiny import build_tiny_llm, build_tiny_tokenizer

SEGMENTS = [
    Segment(0.0, 10.0, "a low quality recording of a piano melody over a steady beat"),
    Segment(10.0, 20.0, "energetic drums and distorted electric guitars"),
    Segment(20.0, 30.0, "a quiet outro with soft strings"),
]
INSTRUCTION = "make it a cosy jazz carol with sleigh bells"


def build_random_llama_3b(tokenizer, dtype: torch.dtype, device: torch.device):
    """Llama-3.2-3B-Instruct's architecture (hub config values), randomly initialised on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    return model


class ReplyLogitsProcessor(LogitsProcessor):
    """A reply grammar (with its length mask) as a transformers logits processor; single use, batch of one."""

    def __init__(self, grammar: ReplyGrammar, vocab_size: int) -> None:
        self.matcher = grammar.matcher()
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif not self.matcher.accept_token(int(input_ids[0, -1])):
            raise RuntimeError("the grammar refused the token its own mask allowed")
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


def timed(fn) -> tuple[object, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def best_of(repeats: int, fn) -> tuple[list[int], float]:
    fn()  # warm-up (allocations, kernels, the HF processor's first call)
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def report(tokens: list[int], seconds: float) -> dict:
    return {
        "new_tokens": len(tokens),
        "seconds": round(seconds, 4),
        "tokens_per_s": round(len(tokens) / seconds, 1),
        "ms_per_token": round(1000 * seconds / len(tokens), 3),
    }


def forward_passes(refiner: Refiner, fn) -> int:
    """Forward passes `fn` makes through `refiner` after the prompt's (one untimed run): compiled
    steps plus multi-token passes, counted around the calls, so CUDA graph replays count too."""
    calls = []
    step, prefill = refiner._step, mtm_bot.stages.refiner.prefill

    def counted(real):
        def call(*args, **kwargs):
            calls.append(real)
            return real(*args, **kwargs)

        return call

    refiner._step, mtm_bot.stages.refiner.prefill = counted(step), counted(prefill)
    try:
        fn()
    finally:
        refiner._step, mtm_bot.stages.refiner.prefill = step, prefill
    return len(calls) - 1


def clip_segments(count: int) -> list[Segment]:
    return [Segment(10.0 * i, 10.0 * (i + 1), SEGMENTS[i % len(SEGMENTS)].caption) for i in range(count)]


def compile_seconds(refiner: Refiner, schema: dict) -> float:
    _, seconds = timed(
        lambda: refiner._compiler.compile_json_schema(
            schema, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=True
        )
    )
    return round(seconds, 3)


def grammar_costs(refiner: Refiner, max_segments: int, before_counts: list[int]) -> dict:
    """Seconds per reply grammar, now and before (bounded patterns, time ranges as constants)."""
    after = {n: compile_seconds(refiner, reply_schema(n, bounded=False)) for n in range(1, max_segments + 1)}
    before = {
        n: compile_seconds(
            refiner, refinement_schema([(format_time(s.start), format_time(s.end)) for s in clip_segments(n)])
        )
        for n in before_counts
    }
    return {"after_per_segment_count": after, "before_per_segment_count": before}


def startup_parts(refiner: Refiner) -> dict:
    """The start-up's grammar work, part by part (timed again after the refiner was built)."""
    info, info_s = timed(lambda: tokenizer_info(refiner.tokenizer, refiner.vocab_size, refiner.stop_token_ids))
    _, budget_s = timed(lambda: StringBudget(info.decoded_vocab, refiner.vocab_size))
    return {"tokenizer_info_s": round(info_s, 3), "string_budget_s": round(budget_s, 3)}


def request_latency(refiner: Refiner, counts: list[int]) -> dict:
    """The first request per segment count after start-up (the first of all also pays the model's first
    passes), then the best of two more."""
    result = {}
    for count in counts:
        segments = clip_segments(count)
        _, first = timed(lambda: refiner.refine(segments, INSTRUCTION))
        warm = min(timed(lambda: refiner.refine(segments, INSTRUCTION))[1] for _ in range(2))
        result[count] = {"first_s": round(first, 3), "warm_s": round(warm, 3)}
    return result


def mask_fill_ms(refiner: Refiner, count: int) -> dict:
    """Milliseconds per token to fill the next-token mask (xgrammar's, then the length mask), over one reply."""
    times = []
    fill = ReplyMatcher.fill_next_token_bitmask

    def timed_fill(self, bitmask, index=0):
        start = time.perf_counter()
        fill(self, bitmask, index)
        times.append(1000 * (time.perf_counter() - start))

    ReplyMatcher.fill_next_token_bitmask = timed_fill
    try:
        refiner.refine(clip_segments(count), INSTRUCTION)
    finally:
        ReplyMatcher.fill_next_token_bitmask = fill
    times.sort()
    return {
        "segments": count,
        "tokens": len(times),
        "median": round(statistics.median(times), 4),
        "p90": round(times[int(0.9 * (len(times) - 1))], 4),
        "max": round(times[-1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--tokens", type=int, default=0, help="new tokens of the free runs (default: the reply's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (the best is reported)")
    parser.add_argument(
        "--vocab",
        choices=["llama3", "tiny"],
        default="llama3",
        help="Llama 3.2's tokenizer (default) or the tests' 512-token one",
    )
    parser.add_argument(
        "--max-segments",
        type=int,
        default=mtm_bot.stages.refiner.EXPECTED_MAX_SEGMENTS,
        help="grammars prepared at start-up (a 60 s clip limit: 6)",
    )
    parser.add_argument(
        "--before",
        default="1,3,6",
        help="segment counts whose old grammar is compiled for comparison (seconds each; '' skips)",
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = model_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.vocab == "llama3":
        from bench.llama3_vocab import build_llama3_tokenizer, build_tiny_llama3

        tokenizer, build_tiny = build_llama3_tokenizer(), build_tiny_llama3
    else:
        tokenizer, build_tiny = build_tiny_tokenizer(), build_tiny_llm
    if args.profile == "tiny":
        model = build_tiny(tokenizer).to(device=device, dtype=dtype)
    else:
        model = build_random_llama_3b(tokenizer, dtype, device)
    t0 = time.perf_counter()
    # Greedy: both paths pick the same tokens.
    refiner = Refiner(model, tokenizer, device, temperature=0.0, max_segments=args.max_segments)
    load_seconds = time.perf_counter() - t0
    requests = request_latency(refiner, [n for n in (1, 3, 6) if n <= args.max_segments])
    mask_fill = mask_fill_ms(refiner, min(6, args.max_segments))
    startup = {"refiner_init_s": round(load_seconds, 3), **startup_parts(refiner)}
    grammars = grammar_costs(refiner, args.max_segments, [int(n) for n in args.before.split(",") if n])
    startup["grammars_s"] = round(sum(grammars["after_per_segment_count"].values()), 3)

    prompt = refiner.encode(refiner.prompt(SEGMENTS, INSTRUCTION))
    grammar = refiner.grammar(len(SEGMENTS))
    bound = max_output_tokens(len(SEGMENTS))
    mask = torch.ones_like(prompt)

    ours_grammar = best_of(args.repeats, lambda: refiner.generate(prompt, grammar, bound))

    def stepwise() -> list[int]:  # the same refiner (one cache, one captured step), jump-forward off
        refiner.jump_forward = False
        try:
            return refiner.generate(prompt, grammar, bound)
        finally:
            refiner.jump_forward = True

    ours_stepwise = best_of(args.repeats, stepwise)

    def hf_grammar() -> list[int]:
        processor = ReplyLogitsProcessor(grammar, refiner.vocab_size)
        out = model.generate(
            prompt,
            attention_mask=mask,
            logits_processor=[processor],
            do_sample=False,
            max_new_tokens=bound,
            eos_token_id=refiner.stop_token_ids,
        )
        tokens = out[0, prompt.shape[1] :].tolist()
        return tokens[:-1] if tokens and tokens[-1] in refiner.stop_token_ids else tokens

    theirs_grammar = best_of(args.repeats, hf_grammar)
    free_tokens = args.tokens or len(ours_stepwise[0])

    stop_token_ids, refiner.stop_token_ids = refiner.stop_token_ids, []  # free runs: exactly --tokens tokens
    ours_free = best_of(args.repeats, lambda: refiner.generate(prompt, None, free_tokens))
    refiner.stop_token_ids = stop_token_ids
    theirs_free = best_of(
        args.repeats,
        lambda: model.generate(
            prompt,
            attention_mask=mask,
            do_sample=False,
            min_new_tokens=free_tokens,
            max_new_tokens=free_tokens,
            eos_token_id=stop_token_ids,
        )[0, prompt.shape[1] :].tolist(),
    )

    ours_g, ours_s, ours_f = report(*ours_grammar), report(*ours_stepwise), report(*ours_free)
    ours_g["forward_passes"] = forward_passes(refiner, lambda: refiner.generate(prompt, grammar, bound))
    ours_s["forward_passes"] = forward_passes(refiner, stepwise)
    overhead_ms = ours_s["ms_per_token"] - ours_f["ms_per_token"]
    result = {
        "profile": args.profile,
        "vocab": args.vocab,
        "vocab_size": refiner.vocab_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "compiled_decode": device.type == "cuda",
        "startup": startup,
        "grammar_compile_s": grammars,
        "request_latency": requests,
        "mask_fill_ms": mask_fill,
        "prompt_tokens": prompt.shape[1],
        "reply_token_bound": bound,
        "ours_grammar": ours_g,
        "ours_grammar_stepwise": ours_s,
        "jump_forward_reply_speedup": round(ours_s["seconds"] / ours_g["seconds"], 2),  # wall time per reply
        "transformers_generate_xgrammar_hf_processor": report(*theirs_grammar),
        "ours_free": ours_f,
        "transformers_generate_free": report(*theirs_free),
        "grammar_overhead_ms_per_token": round(overhead_ms, 3),
        "grammar_overhead_pct": round(100 * overhead_ms / ours_f["ms_per_token"], 1),
        "same_reply_as_transformers": ours_stepwise[0] == theirs_grammar[0],
        "reply_valid": all(
            _valid(refiner.tokenizer.decode(reply, clean_up_tokenization_spaces=False), len(SEGMENTS))
            for reply in (ours_grammar[0], ours_stepwise[0])
        ),
    }
    print(json.dumps(result, indent=2))


def _valid(text: str, segment_count: int) -> bool:
    """Whether the reply parses as strict JSON and validates against the reply schema (its bounds too)."""
    try:
        jsonschema.validate(json.loads(text), reply_schema(segment_count))
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


if __name__ == "__main__":
    main()
