"""The Refiner: the LLM rewrites the clip's captions into schema-valid JSON that carries the user's taste.

One chat-templated request per job (refiner_prompt), decoded under the reply grammar (grammar) by our
own loop, gpt-fast style: a prefill, then one token at a time over a static KV cache, the grammar's
bitmask applied at every step; text the grammar forces is run through the model in one pass
(jump-forward). docs/ARCHITECTURE.md, "The refiner", says why it is built this way.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import xgrammar as xgr

from ..core.instruction import check_instruction
from ..core.progress import CancelToken
from .compiling import CompilePlan, warm_up_or_run_eager
from .grammar import ReplyGrammar, ReplyMatcher, StringBudget, tokenizer_info
from .refiner_prompt import (
    JSON_SEPARATORS,
    RefinedSegment,
    Refinement,
    build_messages,
    build_messages_from_words,
    max_output_tokens,
    reply_schema,
)
from .runtime import from_hub, model_dtype
from .tiny import build_tiny_llm, build_tiny_tokenizer

if TYPE_CHECKING:
    from .captioner import Segment

log = logging.getLogger(__name__)

# Segments the KV cache is sized for at load time (60 s clips, the default limit); more still work, by
# growing the cache (and, on CUDA, recompiling) on that request: a track without a clip has one part per
# 10 s output block, up to 18 (10 861 reply tokens at the schema's bound against 4 513 for six). Sizing
# every request's cache for those would make each decode step read ~2.4x the KV cache. Also the default
# for the reply grammars prepared at load (`max_segments`; the pipeline passes the most parts a request
# can need).
EXPECTED_MAX_SEGMENTS = 6
PROMPT_TOKENS_RESERVE = 1536  # system message + six captions + a long instruction

DEFAULT_TEMPERATURE = 0.3
# Forced runs shorter than this are decoded step by step: a one-token captured step costs less than an
# uncompiled multi-token pass (a guess for the GPU, unmeasured there; on the CPU any run pays).
MIN_JUMP_TOKENS = 2


# --- The decode loop (plain PyTorch, gpt-fast style) ------------------------------------------------


def prefill(model: torch.nn.Module, tokens: torch.Tensor, cache, start: int = 0) -> torch.Tensor:
    """Run tokens [1, T] at positions start.. through the model in one pass, filling the cache; returns the
    next token's logits [1, V]. The prompt goes through here, and so does every run of forced tokens."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)
    out = model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    """One step: token [1, 1] at position [1, 1] -> the next token's logits [1, V]."""
    out = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def pick_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token [1, 1]: greedy at temperature 0, else seeded sampling from the (masked) logits [1, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


class Refiner:
    """The LLM, its tokenizer and grammars, and one KV cache: serves one request at a time (the GPU queue)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        temperature: float = DEFAULT_TEMPERATURE,
        compile: CompilePlan | None = None,
        jump_forward: bool = True,
        max_segments: int = EXPECTED_MAX_SEGMENTS,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.temperature = temperature
        self.jump_forward = jump_forward  # off: every token decoded step by step (as generate() would)
        config: Any = model.config
        self.vocab_size: int = config.vocab_size  # logits' width; may exceed the tokenizer's (padding)
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        self._prepare_grammars(max_segments)
        self._bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._cache = None
        self._cache_len = 0
        self._step = decode_one_token
        plan = compile or CompilePlan.from_setting("auto", device)
        if plan.enabled:
            self._step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        warm_up_or_run_eager("the refiner's decode step", plan, self._warm_up, self._run_eager)

    @classmethod
    def load(
        cls,
        profile: str,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        compile: CompilePlan | None = None,
        max_segments: int = EXPECTED_MAX_SEGMENTS,
    ) -> Refiner:
        """The LLM in `dtype` (default: half precision on CUDA). transformers builds it in that dtype and
        keeps in float32 what must stay there (RoPE's inverse frequencies); Llama's weights are stored in
        bf16, so nothing is rounded on the way."""
        dtype = dtype or model_dtype(device)
        if profile == "tiny":
            tokenizer = build_tiny_tokenizer()
            return cls(
                build_tiny_llm(tokenizer, dtype=dtype).to(device),
                tokenizer,
                device,
                compile=compile,
                max_segments=max_segments,
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = from_hub(model_id, lambda: AutoTokenizer.from_pretrained(model_id))
        model = from_hub(model_id, lambda: AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype))
        return cls(model.to(device), tokenizer, device, compile=compile, max_segments=max_segments)

    def prompt(self, segments: Sequence[Segment], instruction: str, picture: str | None = None) -> str:
        """The chat-templated prompt text, ending where the assistant's reply begins."""
        return self._chat(build_messages(segments, check_instruction(instruction), picture))

    def prompt_from_words(
        self, ranges: Sequence[tuple[float, float]], instruction: str, picture: str | None = None
    ) -> str:
        """The prompt for a track without a clip: one part per output time range."""
        return self._chat(build_messages_from_words(ranges, check_instruction(instruction), picture))

    def _chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prepare_grammars(self, max_segments: int) -> None:
        """Compile the reply grammar for every segment count up to max_segments, so no request compiles one.

        Each takes well under a second even with a 128k-token vocabulary: the grammar leaves string
        lengths to the StringBudget mask, built here once for the vocabulary.
        """
        info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # we keep what we compiled
        self._budget = StringBudget(info.decoded_vocab, self.vocab_size)
        self._grammars: dict[int, ReplyGrammar] = {}
        for count in range(1, max_segments + 1):
            self._grammars[count] = self._compile_grammar(count)

    def _compile_grammar(self, segment_count: int) -> ReplyGrammar:
        compiled = self._compiler.compile_json_schema(
            reply_schema(segment_count, bounded=False),
            any_whitespace=False,
            separators=JSON_SEPARATORS,
            strict_mode=True,
        )
        return ReplyGrammar(compiled, self._budget)

    def grammar(self, segment_count: int) -> ReplyGrammar:
        """The reply grammar for this many segments (one-line JSON), prepared at start-up.

        A count beyond the prepared ones (a clip longer than the settings allow) compiles on that request.
        """
        if segment_count not in self._grammars:
            log.warning("compiling the reply grammar for %d segments on a request", segment_count)
            self._grammars[segment_count] = self._compile_grammar(segment_count)
        return self._grammars[segment_count]

    def refine(
        self,
        segments: Sequence[Segment],
        instruction: str,
        cancel: CancelToken | None = None,
        seed: int = 0,
        picture: str | None = None,
    ) -> Refinement:
        """Rewrite every segment's caption to carry the instruction (and evoke the picture's description);
        one request, always schema-valid."""
        if not segments:
            raise ValueError("refine() needs at least one caption segment")
        return self._reply(self.prompt(segments, instruction, picture), segments, cancel, seed)

    def write(
        self,
        ranges: Sequence[tuple[float, float]],
        instruction: str,
        cancel: CancelToken | None = None,
        seed: int = 0,
        picture: str | None = None,
    ) -> Refinement:
        """Captions for a track without a clip, one per output time range, from the instruction (and the
        picture's description) alone; the same reply schema as refine()."""
        if not ranges:
            raise ValueError("write() needs at least one output time range")
        parts = [RefinedSegment(start, end, "") for start, end in ranges]
        return self._reply(self.prompt_from_words(ranges, instruction, picture), parts, cancel, seed)

    def _reply(
        self, prompt: str, parts: Sequence[Segment | RefinedSegment], cancel: CancelToken | None, seed: int
    ) -> Refinement:
        count = len(parts)
        tokens = self.generate(self.encode(prompt), self.grammar(count), max_output_tokens(count), seed, cancel)
        text = self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)  # exactly what was validated
        return Refinement.from_json(json.loads(text), parts)

    def encode(self, text: str) -> torch.Tensor:
        # The template already wrote the special tokens (BOS, headers); do not add them twice.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        grammar: ReplyGrammar | None,
        max_new_tokens: int,
        seed: int = 0,
        cancel: CancelToken | None = None,
    ) -> list[int]:
        """Decode up to max_new_tokens after the prompt [1, T]; returns the new tokens without the stop token.

        With a grammar, only tokens it allows are ever chosen and decoding ends when it is complete (this
        is how the product runs); `grammar=None` decodes unconstrained until a stop token (benchmarks).
        """
        matcher = grammar.matcher() if grammar is not None else None
        generator = None
        if self.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        prompt_len = prompt_ids.shape[1]
        cache = self._reset_cache(prompt_len + max_new_tokens)
        position = torch.tensor([[prompt_len]], device=self.device)
        tokens: list[int] = []

        logits = prefill(self.model, prompt_ids, cache)
        while len(tokens) < max_new_tokens:
            if cancel is not None:
                cancel.check()
            logits = logits.to(torch.float32, copy=True)  # a private copy: CUDA graphs reuse their outputs
            if matcher is not None:
                # The GPU is still busy with the step just launched: fill the mask meanwhile.
                matcher.fill_next_token_bitmask(self._bitmask)
                xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device, non_blocking=True))
            token = pick_token(logits, self.temperature, generator)
            token_id = int(token)
            if matcher is not None:
                if not matcher.accept_token(token_id):
                    raise RuntimeError(f"the grammar refused token {token_id} that its own mask allowed")
                if matcher.is_terminated():
                    return tokens
            elif token_id in self.stop_token_ids:
                return tokens
            tokens.append(token_id)
            forced = self._forced_tokens(matcher, token_id, max_new_tokens - len(tokens)) if matcher is not None else []
            if forced:  # one pass over the chosen token and the run the grammar forces after it
                run = torch.tensor([[token_id, *forced]], device=self.device)
                logits = prefill(self.model, run, cache, start=prompt_len + len(tokens) - 1)
                tokens += forced
                position += run.shape[1]
            else:
                logits = self._step(self.model, token, position, cache)
                position += 1
        if matcher is not None:
            raise RuntimeError(f"the reply did not finish within {max_new_tokens} tokens, its schema bound")
        return tokens

    def _forced_tokens(self, matcher: ReplyMatcher, chosen: int, room: int) -> list[int]:
        """Tokens of the text the grammar forces after the model's `chosen` token, accepted into `matcher`,
        split the way the tokenizer would split the model's own text: [] when jump-forward is off, the
        run is shorter than MIN_JUMP_TOKENS, or the forced text would not start a token of its own.

        Both ends of the run are boundaries with the model's tokens. At the start, the chosen token and
        the forced text are tokenized together, and the run is taken only if the chosen token stays
        whole (after `"` the tokenizer writes `",` where the grammar forces `, `: then the model decodes
        the next step itself). At the end, the last forced token is left to the model, which may write
        it as part of a longer token (` "` + `Warm` as ` "Warm`), as it would without jump-forward.
        """
        if not self.jump_forward:
            return []
        text = matcher.find_jump_forward_string()
        if not text:
            return []
        chosen_text = self.tokenizer.decode([chosen], clean_up_tokenization_spaces=False)
        ids = self.tokenizer.encode(chosen_text + text, add_special_tokens=False)
        run = ids[1:-1][:room]
        if ids[0] != chosen or len(run) < MIN_JUMP_TOKENS:
            return []
        forced = []
        for token_id in run:
            if not matcher.accept_token(token_id):
                break  # a token reaching past the forced text; the accepted ones are still valid
            forced.append(token_id)
        return forced

    def _reset_cache(self, needed: int):
        """The static KV cache, emptied, with room for `needed` positions.

        It keeps its size between requests (a CUDA graph captured on it stays valid) and only grows when
        a request needs more room than any before.
        """
        from transformers import StaticCache

        if self._cache is not None and needed <= self._cache_len:
            self._cache.reset()
            return self._cache
        if self._cache is not None:
            log.info("growing the refiner's KV cache to %d positions (the compiled step recompiles)", needed)
        self._cache_len = 256 * math.ceil(needed / 256)
        self._cache = StaticCache(config=self.model.config, max_cache_len=self._cache_len)
        return self._cache

    def _run_eager(self) -> None:
        self._step = decode_one_token

    def _warm_up(self) -> None:
        """Compile and capture the decode step at load time, never on a user's request."""
        cache = self._reset_cache(PROMPT_TOKENS_RESERVE + max_output_tokens(EXPECTED_MAX_SEGMENTS))
        with torch.inference_mode():
            token = torch.tensor([[self.stop_token_ids[0]]], device=self.device)
            prefill(self.model, token, cache)
            for step in range(1, 4):  # reduce-overhead records the CUDA graph on the second or third call
                self._step(self.model, token, torch.tensor([[step]], device=self.device), cache)


def _stop_token_ids(model: Any, tokenizer) -> list[int]:
    """The ids that end an assistant turn (Llama 3: <|eot_id|>, <|eom_id|>, <|end_of_text|>)."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    return sorted({ids} if isinstance(ids, int) else set(ids))
