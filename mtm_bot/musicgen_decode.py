"""A fast MusicGen decode loop (gpt-fast style) over the weights of a transformers MusicGen model.

transformers' `generate` grows a dynamic KV cache, rebuilds masks and runs a dozen logits processors
in Python on every step. Here the same decoder runs as plain PyTorch over a static KV cache that is
allocated once, so one decode step is a fixed sequence of kernels: on CUDA it is compiled with
`mode="reduce-overhead"` (one CUDA graph per batch-size bucket); on the CPU it runs eager.

Several blocks (of different jobs) decode in one loop, `generate_batch`; block i decodes in *slot* i:
its own rows of the caches (with classifier-free guidance, a conditional row and a null-conditioned
row beside it), its own row of the delay-pattern buffer and its own position. The loop:
1. per block, once: `condition` (T5 states of its description and, for musicgen-melody, its projected
   chroma or the null melody), then `prefill`: one forward pass over [melody prefix] + start token +
   audio prompt, which fills the slot's caches from cache slot 0 and picks its first tokens;
2. per step, all slots at once, `decode_one_token`: each slot feeds its newest token at its own
   position, attends to its own filled cache slots and writes its next tokens; no host sync.
A block that has all its frames, or whose `on_step` raised, leaves the batch; the others go on.

Same result batched or not: every slot's sequence starts at cache slot 0 and has exactly the
positions it has alone, so there is no padding to mask, and each block draws its noise from its own
generator on its own steps only. What remains is rounding: a row's numbers must not depend on how
many rows share a kernel. On the CPU they do not for matrix products of 4 or more rows (MKL computes
products of 1-3 rows differently) and for attention that reads the cache in whole blocks of 64 slots
(the attention kernel sums a partial block in another order). So a batch has at least 4 rows and an
eager step reads whole blocks: a block's codes are bit for bit the same decoded alone or in any
batch (tests/test_musicgen_decode.py). On CUDA the same layout holds, but whether cuBLAS and the
attention kernels compute a row alike in every bucket is not verified.

The delay pattern (codebook k runs k steps behind codebook 0; in a stereo checkpoint, whose codebooks
interleave left and right, L0 R0 L1 R1 ..., the pair k runs k steps behind) lives in one buffer `codes` of shape
(slots, K, capacity): positions the model must not choose (start/end padding, the audio prompt) hold
their fixed value, positions to sample hold -1. Greedy decoding reproduces transformers'
`generate(do_sample=False)` token for token, for every block of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

FREE = -1  # a delay-pattern slot the model samples; every other value is forced
# Melody conditioning is a decoder prefix of chroma + text sharing the 2048 positions with the 1500
# frames; 256 text tokens (~1000 characters of caption) always fit. The text buffers are sized for this
# many tokens when they are allocated, so a block with any description up to it can join a running loop.
MAX_TEXT_TOKENS = 256
TEXT_BUCKET = 128  # text capacity is a whole number of these
KEY_BLOCK = 64  # eager steps read the KV cache in whole blocks of this many slots (see the module doc)
MIN_CPU_ROWS = 4  # MKL computes a row of a product of 1-3 rows differently from one of 4 or more


@dataclass(frozen=True)
class Sampling:
    guidance_scale: float = 3.0  # classifier-free guidance; <= 1 turns it off (no null rows)
    top_k: int = 250  # 0 = no top-k filter
    top_p: float = 0.0  # 0 = no nucleus filter
    temperature: float = 1.0
    greedy: bool = False  # argmax instead of sampling (used by the equivalence tests)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclass(frozen=True)
class BlockRequest:
    """One block to decode, alone or batched with others; its codes depend on nothing else."""

    input_ids: torch.Tensor  # (1, T) its tokenized description; padding (attention_mask 0) is dropped
    attention_mask: torch.Tensor  # (1, T)
    new_frames: int
    input_features: torch.Tensor | None = None  # (1, frames, 12) chroma, melody model only; None: null melody
    prompt_codes: torch.Tensor | None = None  # (1, K, P) EnCodec codes to continue; the result includes them
    generator: torch.Generator | None = None  # its noise, on the decoder's device; None: torch's default one
    on_step: Callable[[int, int], None] | None = None  # (frames_done, new_frames) after each finished frame

    @property
    def prompt_frames(self) -> int:
        return 0 if self.prompt_codes is None else self.prompt_codes.shape[-1]


@dataclass
class _Conditioning:
    prefix: torch.Tensor | None  # (R, L, d) states prepended to the decoder sequence (melody)
    cross_states: torch.Tensor | None  # (R, T, d) states the decoder cross-attends to (small)
    cross_mask: torch.Tensor | None  # (R, T) bool, True where a cross-attention key may be used


@dataclass
class _Slots:
    """The static buffers one batch-size bucket decodes in: views of the first rows of the allocation.

    Each bucket has its own views, marked static (address and shape), so a compiled step specialises
    on each bucket's shapes (one CUDA graph per bucket) instead of turning the batch size dynamic.
    """

    k_cache: torch.Tensor  # (layers, rows, heads, key capacity, head dim)
    v_cache: torch.Tensor
    codes: torch.Tensor  # (slots, K, token capacity) the delay-pattern buffer
    pos: torch.Tensor  # (slots,) position of each slot's newest token (fed to the next step)
    cache_pos: torch.Tensor  # (slots,) its KV cache slot: pos + the slot's prefix length
    active: torch.Tensor  # (slots,) 1 while a block decodes in the slot, else 0 (its position stays 0)
    noise: torch.Tensor  # (slots, K, V) this step's exponential noise, drawn per slot from its generator
    cross_k: torch.Tensor | None  # (layers, rows, heads, text capacity, head dim), musicgen-small only
    cross_v: torch.Tensor | None
    cross_mask: torch.Tensor | None  # (rows, 1, 1, text capacity)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if t is not None]


@dataclass
class _Block:
    """A request while it decodes in its slot."""

    slot: int
    request: BlockRequest
    done: Done  # gets its codes, or the exception its on_step raised
    steps: int  # decode steps it needs: new_frames + D (the last codebook runs D = delays - 1 steps behind)
    cache_pos: int  # the KV slot of the token its next step feeds (the host's copy)
    step: int = 1  # steps done; its prefill was step 1


Done = Callable[["torch.Tensor | Exception"], None]
# Asked between steps with the number of idle slots; hands in up to that many more blocks to decode.
Admit = Callable[[int], Sequence[tuple[BlockRequest, Done]]]


class MusicgenDecoder:
    """Decodes MusicGen codes for MusicgenMelodyForConditionalGeneration and MusicgenForConditionalGeneration."""

    def __init__(self, model, max_frames: int = 1500, compile: bool | None = None,
                 max_text_tokens: int = MAX_TEXT_TOKENS) -> None:
        self.model = model
        decoder = model.decoder  # MusicgenForCausalLM / MusicgenMelodyForCausalLM
        self.stack = decoder.model.decoder  # embeddings, layers, final layer norm
        self.heads = decoder.lm_heads
        config = decoder.config
        self.num_codebooks = config.num_codebooks
        # Stereo checkpoints interleave left and right codebooks (L0 R0 L1 R1 ...); a pair shares one delay.
        self.channels = config.audio_channels
        self.delays = [k // self.channels for k in range(self.num_codebooks)]  # codebook k runs this far behind
        self.steps_behind = self.delays[-1]  # the last codebooks' delay: a block's extra decode steps
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.pad_token_id = model.generation_config.pad_token_id  # also the decoder start token
        from transformers.activations import ACT2FN

        self.activation = ACT2FN[config.activation_function]
        # musicgen-melody prepends its conditioning to the sequence; musicgen-small cross-attends to it.
        self.prefix_conditioning = not hasattr(self.stack.layers[0], "encoder_attn")
        self.chroma_length = model.config.chroma_length if self.prefix_conditioning else 0
        self.max_frames = max_frames
        self.max_text_tokens = max_text_tokens
        self.device = decoder.lm_heads[0].weight.device
        self.dtype = decoder.lm_heads[0].weight.dtype
        self.qkv_weights, self.heads_weight = _fuse_projections(self.stack.layers, self.heads)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = self.decode_one_token
        if compile:
            self.step = torch.compile(self.decode_one_token, mode="reduce-overhead", fullgraph=True)
        self._allocated: tuple[int, bool] | None = None  # (slots, cfg) of the buffers
        self._buckets: dict[int, _Slots] = {}  # slots -> that bucket's views of the buffers
        self.batch: _Slots | None = None  # the bucket the current batch decodes in
        self.cfg = False  # whether each slot has a null-conditioned row

    def run_eager(self) -> None:
        """Decode with the plain step from now on (the fallback when compiling or capturing fails)."""
        self.step = self.decode_one_token
        self.compiled = False

    # ----------------------------------------------------------------------------------------------
    # Public interface

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[BlockRequest],
                       sampling: Sampling = Sampling()) -> list[torch.Tensor | Exception]:
        """Decode the blocks together; per request, its codes (1, K, P + new_frames), delay pattern
        undone, the prompt's P frames included, or the exception its `on_step` raised (see decode_blocks)."""
        results: list[torch.Tensor | Exception | None] = [None] * len(requests)

        def keep(i: int) -> Done:
            return lambda result: results.__setitem__(i, result)

        self.decode_blocks([(request, keep(i)) for i, request in enumerate(requests)], sampling)
        return results

    @torch.no_grad()
    def decode_blocks(self, blocks: Sequence[tuple[BlockRequest, Done]], sampling: Sampling = Sampling(),
                      max_blocks: int = 1, admit: Admit | None = None) -> None:
        """Decode the blocks in one loop, each handing its result to its `done`; with `admit`, blocks that
        arrive meanwhile join between steps (continuous batching), up to `max_blocks` decoding at once,
        until none is left.

        A block's codes are those it gets decoded alone, and its generator ends in the same state,
        whoever shares the loop and whenever it joined. `on_step(frames_done, new_frames)` runs after
        every step that completes one of its frames (`new_frames` calls); if it raises (e.g. Cancelled),
        that block leaves the loop and draws no more noise, and the others decode on undisturbed. Any
        other error (e.g. out of memory) fails the whole call; the decoder stays usable.
        The loop decodes in the smallest bucket its blocks fit and moves to a larger one when blocks
        join: the buckets are views of one allocation, so the running blocks keep their slots.
        """
        for request, _ in blocks:
            self._check(request)
        if not blocks:
            return
        cfg = sampling.guidance_scale > 1
        most = max(len(blocks), max_blocks)
        self._allocate(self._bucket(most, cfg), cfg)
        self.cfg = cfg
        bucket = 0  # slots of the bucket the loop decodes in; none yet

        waiting, running = list(blocks), []
        while True:
            room = most - len(running) - len(waiting)
            if admit is not None and room > 0:
                waiting += [(r, done) for r, done in admit(room) if self._joins(r, done)]
            if len(running) + len(waiting) > bucket:
                bucket = self._grow(bucket, len(running) + len(waiting), cfg)
            idle = sorted(set(range(bucket)) - {block.slot for block in running})
            for slot, (request, done) in zip(idle, waiting):
                running.append(self._admit(slot, request, done, sampling))  # its step 1
            waiting = []
            running = [block for block in running if self._report(block)]
            if not running:
                return
            for block in running:
                self._draw_noise(block.slot, block.request.generator, sampling)
            self.step(self._keys_to_read(max(block.cache_pos for block in running) + 1), sampling)
            self.batch.pos.add_(self.batch.active)  # idle slots stay at position 0
            self.batch.cache_pos.add_(self.batch.active)
            for block in running:
                block.cache_pos += 1
                block.step += 1

    @torch.no_grad()
    def generate_codes(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       input_features: torch.Tensor | None = None, prompt_codes: torch.Tensor | None = None,
                       new_frames: int, sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                       on_step: Callable[[int, int], None] | None = None) -> torch.LongTensor:
        """One block (see BlockRequest for the arguments): codes (1, K, P + new_frames), delay pattern undone,
        the prompt's P frames included. An exception `on_step` raises stops the block and propagates."""
        request = BlockRequest(input_ids, attention_mask, new_frames, input_features, prompt_codes, generator, on_step)
        (result,) = self.generate_batch([request], sampling)
        if isinstance(result, Exception):
            raise result
        return result

    def warmup(self, frames: int = 8, max_batch: int = 1) -> None:
        """Allocate the buffers for `max_batch` blocks and, when compiled, compile and capture the step of
        every batch-size bucket up to there (default sampling), so that no request compiles or captures.

        Melody-conditioned and continued blocks use the same step graph: the buffers are sized by
        max_frames and max_text_tokens, not by the block.
        """
        cfg = Sampling().guidance_scale > 1
        largest = self._bucket(max_batch, cfg)
        self._allocate(largest, cfg)  # the largest first: every bucket is a view of it
        if not self.compiled:
            return
        input_ids = torch.zeros((1, self.max_text_tokens), dtype=torch.long, device=self.device)
        features = None
        if self.prefix_conditioning:
            features = torch.zeros(1, frames, self.model.config.num_chroma, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        request = BlockRequest(input_ids, torch.ones_like(input_ids), frames, features, generator=generator)
        for bucket in sorted({self._bucket(n, cfg) for n in range(1, largest + 1)}):
            for _ in range(3):  # compile, warm up, record the CUDA graph
                self.generate_batch([request] * bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------------------------------------
    # Blocks entering and leaving the batch

    def _check(self, request: BlockRequest) -> None:
        """Refuse a malformed request before any block of the batch starts."""
        rows = [t.shape[0] for t in (request.input_ids, request.attention_mask, request.input_features,
                                     request.prompt_codes) if t is not None]
        if request.input_ids.dim() != 2 or rows != [1] * len(rows):
            raise ValueError("a request holds one block: input_ids (1, T), input_features (1, frames, 12), "
                             "prompt_codes (1, K, P); decode several together with generate_batch")
        if request.prompt_codes is not None and request.prompt_codes.shape[1] != self.num_codebooks:
            raise ValueError(f"the prompt has {request.prompt_codes.shape[1]} codebooks; this "
                             f"{'stereo' if self.channels == 2 else 'mono'} model has {self.num_codebooks}")
        if int(request.attention_mask.sum()) > self.max_text_tokens:
            raise ValueError(f"the description has {int(request.attention_mask.sum())} tokens, more than the "
                             f"{self.max_text_tokens} the decoder is sized for; truncate it")
        if request.new_frames < 1 or request.prompt_frames + request.new_frames > self.max_frames:
            raise ValueError(f"prompt + new frames must be 1..{self.max_frames}, "
                             f"got {request.prompt_frames} + {request.new_frames}")
        if request.input_features is not None and not self.prefix_conditioning:
            raise ValueError("input_features (chroma) need a musicgen-melody model")
        if request.generator is not None and request.generator.device.type != self.device.type:
            raise ValueError(f"the generator must live on {self.device} (the noise is drawn there, per step)")

    def _bucket(self, requests: int, cfg: bool) -> int:
        """Slots for a batch: the next power of two (one captured graph per bucket), and on the CPU enough
        for MIN_CPU_ROWS rows (else a block alone would round differently from the same block batched)."""
        slots = 1 << (requests - 1).bit_length()
        if self.device.type == "cpu":
            slots = max(slots, MIN_CPU_ROWS // (2 if cfg else 1))
        return slots

    def _joins(self, request: BlockRequest, done: Done) -> bool:
        """Whether a block handed in between steps can join the loop; one that cannot hears why at once."""
        try:
            self._check(request)
        except ValueError as error:
            done(error)
            return False
        return True

    def _grow(self, bucket: int, blocks: int, cfg: bool) -> int:
        """Move the loop to the bucket for `blocks` (a view of the same buffers: the running blocks keep
        their slots, rows and positions); its new slots start idle. Returns its slots."""
        grown = self._bucket(blocks, cfg)
        self.batch = self._buckets[grown]
        for slot in range(bucket, grown):
            self._release(slot)
        return grown

    def _admit(self, slot: int, request: BlockRequest, done: Done, sampling: Sampling) -> _Block:
        """Condition the slot on the request, lay out its delay pattern and prefill it (its step 1)."""
        # Padding dropped: a description padded to share a tokenizer call decodes as it does alone.
        input_ids = request.input_ids[request.attention_mask.bool()][None].to(self.device)
        features = None if request.input_features is None else request.input_features.to(self.device)
        cond = self.condition(input_ids, torch.ones_like(input_ids), features, self.cfg)
        steps = request.new_frames + self.steps_behind
        self._fill_delay_pattern(slot, request.prompt_codes, steps)
        start = 1 + request.prompt_frames  # start token + prompt: the first sampled position
        self._draw_noise(slot, request.generator, sampling)
        self.prefill(slot, cond, start, sampling)
        cache_pos = start + (0 if cond.prefix is None else cond.prefix.shape[1])
        self.batch.pos[slot] = start  # the newest token, fed to the next step ...
        self.batch.cache_pos[slot] = cache_pos  # ... and its slot in the KV cache
        self.batch.active[slot] = 1
        return _Block(slot, request, done, steps, cache_pos)

    def _report(self, block: _Block) -> bool:
        """After the block's latest step: tell its `on_step` about a finished frame; False once the block
        is done (its codes, or the exception its `on_step` raised, handed to its `done`)."""
        request, behind, step = block.request, self.steps_behind, block.step
        if request.on_step is not None and step > behind:  # frame `step - behind` now has all its codebooks
            try:
                request.on_step(step - behind, request.new_frames)
            except Exception as error:  # e.g. Cancelled: this block leaves, the others decode on
                self._release(block.slot)
                block.done(error)
                return False
        if step < block.steps:
            return True
        codes = self._take_codes(block.slot, request.prompt_frames + request.new_frames)
        self._release(block.slot)
        block.done(codes)
        return False

    def _take_codes(self, slot: int, frames: int) -> torch.Tensor:
        """The slot's frames (1, K, frames), delay pattern undone."""
        codes = self.batch.codes[slot]
        return torch.stack([codes[k, d + 1: d + 1 + frames] for k, d in enumerate(self.delays)])[None]

    def _release(self, slot: int) -> None:
        """Idle the slot: it keeps decoding its start token at position 0 (a captured graph runs every
        slot), writing only into its own rows, which the next block in the slot overwrites."""
        batch = self.batch
        batch.codes[slot].fill_(self.pad_token_id)
        batch.pos[slot] = 0
        batch.cache_pos[slot] = 0
        batch.active[slot] = 0
        batch.noise[slot].fill_(1)

    def _draw_noise(self, slot: int, generator: torch.Generator | None, sampling: Sampling) -> None:
        """Exponential noise for the slot's next step (sample = argmax(probs / noise)), from its own generator."""
        if not sampling.greedy:
            self.batch.noise[slot].exponential_(generator=generator)

    # ----------------------------------------------------------------------------------------------
    # Conditioning, buffers

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  input_features: torch.Tensor | None, cfg: bool) -> _Conditioning:
        """The conditional rows and, with CFG, the null rows after them (what transformers builds); for
        one block, the rows of its slot."""
        model = self.model
        text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if hasattr(model, "enc_to_dec_proj"):
            text = model.enc_to_dec_proj(text)
        mask = attention_mask.bool()
        if cfg:  # the null condition is all-zero text states with an all-zero mask
            text = torch.cat([text, torch.zeros_like(text)])
        row_mask = torch.cat([mask, torch.zeros_like(mask)]) if cfg else mask
        text = text * row_mask[..., None].to(text.dtype)  # padding states are zeroed, as in transformers
        if not self.prefix_conditioning:
            # Null rows have all-zero keys and values: attending to them contributes exactly zero,
            # so they may use every key (an all-masked row would be NaN in SDPA).
            cross_mask = torch.cat([mask, torch.ones_like(mask)]) if cfg else mask
            return _Conditioning(None, text, cross_mask)

        # Chroma: the null melody is a one-hot on the first bin; without a melody both rows use it.
        null = torch.zeros(input_ids.shape[0], 1 if input_features is None else input_features.shape[1],
                           model.config.num_chroma, device=self.device, dtype=self.dtype)
        null[:, :, 0] = 1
        chroma = null if input_features is None else input_features.to(self.dtype)
        if cfg:
            chroma = torch.cat([chroma, null])
        if hasattr(model, "audio_enc_to_dec_proj"):
            chroma = model.audio_enc_to_dec_proj(chroma)
        repeats = -(-self.chroma_length // chroma.shape[1])  # tile short melodies, cut long ones
        chroma = chroma.repeat(1, repeats, 1)[:, : self.chroma_length]
        return _Conditioning(torch.cat([chroma, text], dim=1), None, None)

    def _allocate(self, slots: int, cfg: bool) -> None:
        """Static buffers for `slots` blocks and descriptions up to max_text_tokens; kept (never shrunk)
        while CFG matches. Reallocating drops the buffers' contents: only between loops."""
        if self._allocated is not None and self._allocated[1] == cfg and slots <= self._allocated[0]:
            return
        text_capacity = -(-self.max_text_tokens // TEXT_BUCKET) * TEXT_BUCKET
        token_capacity = self.max_frames + 1 + self.steps_behind  # start token + frames + delay tail
        prefix_capacity = self.chroma_length + text_capacity if self.prefix_conditioning else 0
        positions = self.stack.embed_positions.weights.shape[0]
        if prefix_capacity + token_capacity > positions:
            raise ValueError(f"{self.max_text_tokens} text tokens + max_frames={self.max_frames} exceed the model's "
                             f"{positions} positions; lower max_text_tokens or max_frames")
        capacity = -(-(prefix_capacity + token_capacity) // KEY_BLOCK) * KEY_BLOCK  # whole blocks, aligned
        rows = slots * (2 if cfg else 1)  # CFG: each slot's conditional row, then its null row
        layers, shape = len(self.stack.layers), (rows, self.num_heads, capacity, self.head_dim)
        kw = dict(device=self.device, dtype=self.dtype)
        self.k_cache = torch.zeros(layers, *shape, **kw)
        self.v_cache = torch.zeros(layers, *shape, **kw)
        self.key_positions = torch.arange(capacity, device=self.device)
        self.codes = torch.full((slots, self.num_codebooks, token_capacity), self.pad_token_id, dtype=torch.long,
                                device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.cache_pos = torch.zeros_like(self.pos)
        self.active = torch.zeros_like(self.pos)
        self.noise = torch.ones(slots, self.num_codebooks, self.heads[0].out_features, device=self.device)
        self.cross_k = self.cross_v = self.cross_mask = None
        if not self.prefix_conditioning:
            cross_shape = (rows, self.num_heads, text_capacity, self.head_dim)
            self.cross_k = torch.zeros(layers, *cross_shape, **kw)
            self.cross_v = torch.zeros(layers, *cross_shape, **kw)
            # An idle slot attends to all-zero keys and values: output zero, not the NaN of an all-masked row.
            self.cross_mask = torch.ones(rows, 1, 1, text_capacity, dtype=torch.bool, device=self.device)
        # These keep their address for the decoder's life: marked static, a CUDA graph reads and writes them
        # in place instead of copying them in and out on every replay.
        torch._dynamo.mark_static_address(self.key_positions)
        self._buckets = {}
        bucket = 1
        while bucket <= slots:
            self._buckets[bucket] = self._views(bucket, bucket * (2 if cfg else 1))
            bucket *= 2
        self._allocated = (slots, cfg)

    def _views(self, slots: int, rows: int) -> _Slots:
        cross = (None, None, None) if self.prefix_conditioning else (
            self.cross_k[:, :rows], self.cross_v[:, :rows], self.cross_mask[:rows])
        views = _Slots(self.k_cache[:, :rows], self.v_cache[:, :rows], self.codes[:slots], self.pos[:slots],
                       self.cache_pos[:slots], self.active[:slots], self.noise[:slots], *cross)
        for tensor in views.tensors():
            torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static(tensor)
        return views

    def _fill_delay_pattern(self, slot: int, prompt_codes: torch.Tensor | None, steps: int) -> None:
        """Codebook k, delayed by d: d + 1 start pads, the prompt, free slots, then pads to the end (as
        transformers' build_delay_pattern_mask)."""
        pad, codes = self.pad_token_id, self.batch.codes[slot]
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[-1]
        end = 1 + prompt_frames + steps  # sequence length, start token included
        codes.fill_(FREE)
        for k, d in enumerate(self.delays):
            codes[k, : d + 1] = pad
            if prompt_codes is not None:
                codes[k, d + 1: d + 1 + prompt_frames] = prompt_codes[0, k].to(self.device)
            codes[k, end - self.steps_behind + d: end] = pad

    # ----------------------------------------------------------------------------------------------
    # The model

    def prefill(self, slot: int, cond: _Conditioning, start: int, sampling: Sampling) -> None:
        """One pass over the slot's [prefix] + start token + prompt (its first `start` tokens): fills its
        caches from slot 0, picks its next tokens."""
        batch, rows = self.batch, self._rows_of(slot)
        if cond.cross_states is not None:  # cross-attention K/V over the text, computed once per block
            text_len = cond.cross_states.shape[1]
            for buffer in (batch.cross_k, batch.cross_v):
                buffer[:, rows] = 0
            batch.cross_mask[rows] = False
            batch.cross_mask[rows, 0, 0, :text_len] = cond.cross_mask
            for i, layer in enumerate(self.stack.layers):
                batch.cross_k[i, rows, :, :text_len] = self._split_heads(layer.encoder_attn.k_proj(cond.cross_states))
                batch.cross_v[i, rows, :, :text_len] = self._split_heads(layer.encoder_attn.v_proj(cond.cross_states))
        hidden = self._embed(self._with_null_rows(batch.codes[slot: slot + 1, :, :start]))
        if cond.prefix is not None:
            hidden = torch.cat([cond.prefix, hidden], dim=1)
        positions = torch.arange(hidden.shape[1], device=self.device)
        hidden = self._forward(hidden + self.stack.embed_positions.weights[positions], rows, None, None)
        noise = None if sampling.greedy else batch.noise[slot: slot + 1]
        self._choose(self._logits(hidden), slice(slot, slot + 1), torch.tensor([start], device=self.device),
                     noise, sampling)

    def decode_one_token(self, keys: int, sampling: Sampling) -> None:
        """For every slot of the batch: feed its token at `pos` (KV slot `cache_pos`), attend to the first
        `keys` slots of its own cache (masked past its own position), and write its next tokens at pos + 1."""
        batch, K = self.batch, self.num_codebooks
        tokens = batch.codes.gather(2, batch.pos.view(-1, 1, 1).expand(-1, K, 1))  # (slots, K, 1)
        cache_pos = self._with_null_rows(batch.cache_pos)  # per row
        mask = (self.key_positions[:keys] <= cache_pos[:, None]).view(-1, 1, 1, keys)
        hidden = self._embed(self._with_null_rows(tokens)) + self.stack.embed_positions.weights[cache_pos][:, None]
        hidden = self._forward(hidden, slice(None), cache_pos, mask)
        self._choose(self._logits(hidden), slice(None), batch.pos + 1, None if sampling.greedy else batch.noise,
                     sampling)

    def _keys_to_read(self, filled: int) -> int:
        """A captured graph has one static shape: it reads every slot (masked). Eager steps read only the
        blocks holding the `filled` slots, which on the CPU saves reading the whole cache per step; whole
        blocks, because the attention kernel rounds a partial block differently (see the module doc)."""
        if self.compiled:
            return self.k_cache.shape[3]
        return min(-(-filled // KEY_BLOCK) * KEY_BLOCK, self.k_cache.shape[3])

    def _rows_of(self, slot: int) -> slice:
        """The cache rows of a slot: its conditional row and, with CFG, its null row right after it."""
        rows = 2 if self.cfg else 1
        return slice(slot * rows, (slot + 1) * rows)

    def _with_null_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slot values per row: the null-conditioned row sees what its conditional row sees."""
        return x.repeat_interleave(2, dim=0) if self.cfg else x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the K codebook embeddings (in transformers' order, for identical rounding)."""
        return sum(self.stack.embed_tokens[k](tokens[:, k]) for k in range(self.num_codebooks))

    def _forward(self, hidden: torch.Tensor, rows: slice, cache_pos: torch.Tensor | None,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Pre-norm decoder layers over the cache rows `rows`. A prefill (`cache_pos` None) is causal
        attention over its own sequence from cache slot 0; a step writes each row's one token at its
        `cache_pos` and attends to the cache under `mask`."""
        for i, layer in enumerate(self.stack.layers):
            hidden = hidden + self._self_attention(i, layer.self_attn, layer.self_attn_layer_norm(hidden), rows,
                                                   cache_pos, mask)
            if not self.prefix_conditioning:
                hidden = hidden + self._cross_attention(i, layer.encoder_attn, layer.encoder_attn_layer_norm(hidden),
                                                        rows)
            hidden = hidden + layer.fc2(self.activation(layer.fc1(layer.final_layer_norm(hidden))))
        return self.stack.layer_norm(hidden)

    def _self_attention(self, i: int, attn, x: torch.Tensor, rows: slice, cache_pos: torch.Tensor | None,
                        mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (self._split_heads(part) for part in F.linear(x, self.qkv_weights[i]).chunk(3, dim=-1))
        k_cache, v_cache = self.batch.k_cache[i, rows], self.batch.v_cache[i, rows]
        if cache_pos is None:
            k_cache[:, :, : k.shape[2]] = k
            v_cache[:, :, : v.shape[2]] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        else:
            index = cache_pos.view(-1, 1, 1, 1).expand_as(k)  # each row's own cache slot
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            keys = mask.shape[-1]
            out = F.scaled_dot_product_attention(q, k_cache[:, :, :keys], v_cache[:, :, :keys], attn_mask=mask,
                                                 scale=attn.scaling)
        return attn.out_proj(self._merge_heads(out))

    def _cross_attention(self, i: int, attn, x: torch.Tensor, rows: slice) -> torch.Tensor:
        q = self._split_heads(attn.q_proj(x))
        batch = self.batch
        out = F.scaled_dot_product_attention(q, batch.cross_k[i, rows], batch.cross_v[i, rows],
                                             attn_mask=batch.cross_mask[rows], scale=attn.scaling)
        return attn.out_proj(self._merge_heads(out))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, S, d) -> (R, H, S, D)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, H, S, D) -> (R, S, d)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (R, S, d) -> (R, K, V), float32 like generate
        return F.linear(hidden[:, -1], self.heads_weight).view(hidden.shape[0], self.num_codebooks, -1).float()

    # ----------------------------------------------------------------------------------------------
    # Guidance and sampling

    def _choose(self, logits: torch.Tensor, slots: slice, write_pos: torch.Tensor, noise: torch.Tensor | None,
                sampling: Sampling) -> None:
        """Guide, filter and sample the next tokens of `slots`; keep forced delay-pattern values; write them
        to `codes` at each slot's `write_pos`."""
        if self.cfg:  # rows come in (conditional, null) pairs
            cond, uncond = logits.view(-1, 2, *logits.shape[1:]).unbind(1)
            logits = uncond + (cond - uncond) * sampling.guidance_scale
        if sampling.greedy:
            chosen = logits.argmax(dim=-1)
        else:
            logits = logits / sampling.temperature
            if sampling.top_k > 0:
                kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if 0 < sampling.top_p < 1:
                logits = _top_p_filter(logits, sampling.top_p)
            chosen = (logits.softmax(dim=-1) / noise).argmax(dim=-1)  # exponential race = a categorical sample
        codes = self.batch.codes[slots]
        index = write_pos.view(-1, 1, 1).expand(-1, self.num_codebooks, 1)
        forced = codes.gather(2, index)
        codes.scatter_(2, index, torch.where(forced == FREE, chosen.unsqueeze(2), forced))


def _fuse_projections(layers, heads) -> tuple[list[torch.nn.Parameter], torch.nn.Parameter]:
    """One (3d, d) weight per layer for q, k and v, and one (K·V, d) weight for the K codebook heads.

    A decode step is a GEMV per projection, so 3 + K launches become 1 + 1, and one wider GEMV keeps
    more of the GPU busy. The model's own Linear layers are re-pointed at slices of the fused weights:
    no weight is stored twice, and transformers' forward still runs on exactly these numbers. (So build
    the decoder after the model is on its device and dtype: moving it later would split them again.)
    """
    qkv_weights = []
    for layer in layers:
        projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        qkv_weights.append(_share_one_weight(projections))
    return qkv_weights, _share_one_weight(heads)


def _share_one_weight(linears) -> torch.nn.Parameter:
    """Concatenate the weights of bias-free Linear layers along their outputs; each keeps a view of its rows."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("MusicGen's decoder projections have no bias; this checkpoint's do")
    # A Parameter, like the weights it replaces: torch.compile treats parameters as static inputs, so the
    # CUDA graph reads them in place (a plain tensor would be copied into the graph on every replay).
    fused = torch.nn.Parameter(torch.cat([linear.weight.detach() for linear in linears]), requires_grad=False)
    start = 0
    for linear in linears:
        rows = linear.out_features
        linear.weight = torch.nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already suffices
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
