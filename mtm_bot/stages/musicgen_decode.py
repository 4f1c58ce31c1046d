"""A fast MusicGen decode loop (gpt-fast style): `prefill` and `decode_one_token` over the network of
mtm_bot.stages.musicgen_net and the static buffers of mtm_bot.stages.musicgen_slots, sampling by mtm_bot.stages.sampling.

transformers' `generate` grows a dynamic KV cache, rebuilds masks and runs a dozen logits processors in
Python on every step. Here one decode step is a fixed sequence of kernels: on CUDA it is compiled with
`mode="reduce-overhead"` (one CUDA graph per batch-size bucket); on the CPU it runs eager.

Several blocks (of different jobs) decode in one loop; each in its own slot:
1. per block, once: `condition` (T5 states of its description and, for the melody family, its projected
   chroma or the null melody), then `prefill`: one forward pass over [melody prefix] + start token +
   audio prompt, which fills the slot's caches from cache slot 0 and picks its first tokens;
2. per step, all slots at once, `decode_one_token`: each slot feeds its newest token at its own
   position, attends to its own filled cache slots and writes its next tokens; no host sync.
A block that has all its frames, or whose `on_step` raised, leaves the batch; the others go on, and
blocks handed in between steps join (continuous batching).

Same result batched or not: every slot's sequence starts at cache slot 0 and has exactly the positions
it has alone, so there is no padding to mask, and each block draws its noise from its own generator on
its own steps only. What remains is rounding: a row's numbers must not depend on how many rows share a
kernel. On the CPU they do not for matrix products of 4 or more rows (MKL computes products of 1-3 rows
differently) and for attention that reads the cache in whole blocks of 64 slots (the attention kernel
sums a partial block in another order). So a batch has at least 4 rows and an eager step reads whole
blocks: a block's codes are bit for bit the same decoded alone or in any batch
(tests/test_musicgen_decode.py). On CUDA the same layout holds, but whether cuBLAS and the attention
kernels compute a row alike in every bucket is not verified. Greedy decoding reproduces transformers'
`generate(do_sample=False)` token for token, for every block of a batch, mono or stereo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .musicgen_net import Conditioning, MusicgenNet
from .musicgen_slots import FREE, KEY_BLOCK, SlotBuffers, Slots
from .sampling import Sampling, choose, guide

# Melody conditioning is a decoder prefix of chroma + text sharing the 2048 positions with the 1500
# frames; 256 text tokens (~1000 characters of caption) always fit. The text buffers are sized for this
# many tokens when they are allocated, so a block with any description up to it can join a running loop.
MAX_TEXT_TOKENS = 256
MIN_CPU_ROWS = 4  # MKL computes a row of a product of 1-3 rows differently from one of 4 or more


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
    """Decodes MusicGen codes for MusicgenMelodyForConditionalGeneration and MusicgenForConditionalGeneration,
    mono or stereo."""

    def __init__(
        self, model, max_frames: int = 1500, compile: bool | None = None, max_text_tokens: int = MAX_TEXT_TOKENS
    ) -> None:
        self.model = model
        self.net = MusicgenNet(model)
        self.num_codebooks = self.net.num_codebooks
        self.channels = self.net.channels
        self.max_frames = max_frames
        self.max_text_tokens = max_text_tokens
        self.device = self.net.device
        self.buffers = SlotBuffers(self.net, max_frames, max_text_tokens, model.generation_config.pad_token_id)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = self.decode_one_token
        if compile:
            self.step = torch.compile(self.decode_one_token, mode="reduce-overhead", fullgraph=True)
        self.batch: Slots | None = None  # the bucket the current loop decodes in
        self.guided = False  # whether each slot has a null-conditioned row (classifier-free guidance)

    def run_eager(self) -> None:
        """Decode with the plain step from now on (the fallback when compiling or capturing fails)."""
        self.step = self.decode_one_token
        self.compiled = False

    # ----------------------------------------------------------------------------------------------
    # Public interface

    @torch.no_grad()
    def generate_batch(
        self, requests: Sequence[BlockRequest], sampling: Sampling = Sampling()
    ) -> list[torch.Tensor | Exception]:
        """Decode the blocks together; per request, its codes (1, K, P + new_frames), delay pattern
        undone, the prompt's P frames included, or the exception its `on_step` raised (see decode_blocks)."""
        results: dict[int, torch.Tensor | Exception] = {}

        def keep(i: int) -> Done:
            return lambda result: results.__setitem__(i, result)

        self.decode_blocks([(request, keep(i)) for i, request in enumerate(requests)], sampling)
        return [results[i] for i in range(len(requests))]

    @torch.no_grad()
    def decode_blocks(
        self,
        blocks: Sequence[tuple[BlockRequest, Done]],
        sampling: Sampling = Sampling(),
        max_blocks: int = 1,
        admit: Admit | None = None,
    ) -> None:
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
        most = max(len(blocks), max_blocks)
        self.guided = sampling.guided
        self.buffers.allocate(self._bucket(most), self.guided)
        bucket = 0  # slots of the bucket the loop decodes in; none yet

        waiting, running = list(blocks), list[_Block]()
        while True:
            room = most - len(running) - len(waiting)
            if admit is not None and room > 0:
                waiting += [(r, done) for r, done in admit(room) if self._joins(r, done)]
            if len(running) + len(waiting) > bucket:
                bucket = self._grow(bucket, len(running) + len(waiting))
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
            batch = self._batch()
            batch.pos.add_(batch.active)  # idle slots stay at position 0
            batch.cache_pos.add_(batch.active)
            for block in running:
                block.cache_pos += 1
                block.step += 1

    @torch.no_grad()
    def generate_codes(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_features: torch.Tensor | None = None,
        prompt_codes: torch.Tensor | None = None,
        new_frames: int,
        sampling: Sampling = Sampling(),
        generator: torch.Generator | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
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
        sampling = Sampling()
        largest = self._bucket(max_batch, sampling.guided)
        self.buffers.allocate(largest, sampling.guided)  # the largest first: every bucket is a view of it
        if not self.compiled:
            return
        input_ids = torch.zeros((1, self.max_text_tokens), dtype=torch.long, device=self.device)
        features = None
        if self.net.prefix_conditioning:
            features = torch.zeros(1, frames, self.model.config.num_chroma, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        request = BlockRequest(input_ids, torch.ones_like(input_ids), frames, features, generator=generator)
        for bucket in sorted({self._bucket(n, sampling.guided) for n in range(1, largest + 1)}):
            for _ in range(3):  # compile, warm up, record the CUDA graph
                self.generate_batch([request] * bucket, sampling)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------------------------------------
    # Blocks entering and leaving the batch

    def _check(self, request: BlockRequest) -> None:
        """Refuse a malformed request before any block of the batch starts."""
        rows = [
            t.shape[0]
            for t in (request.input_ids, request.attention_mask, request.input_features, request.prompt_codes)
            if t is not None
        ]
        if request.input_ids.dim() != 2 or rows != [1] * len(rows):
            raise ValueError(
                "a request holds one block: input_ids (1, T), input_features (1, frames, 12), "
                "prompt_codes (1, K, P); decode several together with generate_batch"
            )
        if request.prompt_codes is not None and request.prompt_codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"the prompt has {request.prompt_codes.shape[1]} codebooks; this "
                f"{'stereo' if self.channels == 2 else 'mono'} model has {self.num_codebooks}"
            )
        if int(request.attention_mask.sum()) > self.max_text_tokens:
            raise ValueError(
                f"the description has {int(request.attention_mask.sum())} tokens, more than the "
                f"{self.max_text_tokens} the decoder is sized for; truncate it"
            )
        if request.new_frames < 1 or request.prompt_frames + request.new_frames > self.max_frames:
            raise ValueError(
                f"prompt + new frames must be 1..{self.max_frames}, got {request.prompt_frames} + {request.new_frames}"
            )
        if request.input_features is not None and not self.net.prefix_conditioning:
            raise ValueError("input_features (chroma) need a musicgen-melody model")
        if request.generator is not None and request.generator.device.type != self.device.type:
            raise ValueError(f"the generator must live on {self.device} (the noise is drawn there, per step)")

    def _bucket(self, requests: int, guided: bool | None = None) -> int:
        """Slots for a batch: the next power of two (one captured graph per bucket), and on the CPU enough
        for MIN_CPU_ROWS rows (else a block alone would round differently from the same block batched)."""
        guided = self.guided if guided is None else guided
        slots = 1 << (requests - 1).bit_length()
        if self.device.type == "cpu":
            slots = max(slots, MIN_CPU_ROWS // (2 if guided else 1))
        return slots

    def _joins(self, request: BlockRequest, done: Done) -> bool:
        """Whether a block handed in between steps can join the loop; one that cannot hears why at once."""
        try:
            self._check(request)
        except ValueError as error:
            done(error)
            return False
        return True

    def _grow(self, bucket: int, blocks: int) -> int:
        """Move the loop to the bucket for `blocks` (a view of the same buffers: the running blocks keep
        their slots, rows and positions); its new slots start idle. Returns its slots."""
        grown = self._bucket(blocks)
        self.batch = self.buffers.buckets[grown]
        for slot in range(bucket, grown):
            self.buffers.release(self.batch, slot)
        return grown

    def _admit(self, slot: int, request: BlockRequest, done: Done, sampling: Sampling) -> _Block:
        """Condition the slot on the request, lay out its delay pattern and prefill it (its step 1)."""
        batch = self._batch()
        # Padding dropped: a description padded to share a tokenizer call decodes as it does alone.
        input_ids = request.input_ids[request.attention_mask.bool()][None].to(self.device)
        features = None if request.input_features is None else request.input_features.to(self.device)
        cond = self.net.condition(input_ids, torch.ones_like(input_ids), features, self.guided)
        steps = request.new_frames + self.buffers.steps_behind
        self.buffers.lay_out(batch, slot, request.prompt_codes, steps)
        start = 1 + request.prompt_frames  # start token + prompt: the first sampled position
        self._draw_noise(slot, request.generator, sampling)
        self.prefill(slot, cond, start, sampling)
        cache_pos = start + (0 if cond.prefix is None else cond.prefix.shape[1])
        batch.pos[slot] = start  # the newest token, fed to the next step ...
        batch.cache_pos[slot] = cache_pos  # ... and its slot in the KV cache
        batch.active[slot] = 1
        return _Block(slot, request, done, steps, cache_pos)

    def _report(self, block: _Block) -> bool:
        """After the block's latest step: tell its `on_step` about a finished frame; False once the block
        is done (its codes, or the exception its `on_step` raised, handed to its `done`)."""
        request, behind, step = block.request, self.buffers.steps_behind, block.step
        if request.on_step is not None and step > behind:  # frame `step - behind` now has all its codebooks
            try:
                request.on_step(step - behind, request.new_frames)
            except Exception as error:  # e.g. Cancelled: this block leaves, the others decode on
                self.buffers.release(self._batch(), block.slot)
                block.done(error)
                return False
        if step < block.steps:
            return True
        codes = self.buffers.take_codes(self._batch(), block.slot, request.prompt_frames + request.new_frames)
        self.buffers.release(self._batch(), block.slot)
        block.done(codes)
        return False

    def _draw_noise(self, slot: int, generator: torch.Generator | None, sampling: Sampling) -> None:
        """Exponential noise for the slot's next step (sample = argmax(probs / noise)), from its own generator."""
        if not sampling.greedy:
            self._batch().noise[slot].exponential_(generator=generator)

    def _batch(self) -> Slots:
        assert self.batch is not None, "no decode loop is running"
        return self.batch

    # ----------------------------------------------------------------------------------------------
    # The steps

    def prefill(self, slot: int, cond: Conditioning, start: int, sampling: Sampling) -> None:
        """One pass over the slot's [prefix] + start token + prompt (its first `start` tokens): fills its
        caches from slot 0, picks its next tokens."""
        batch, rows, net = self._batch(), self._rows_of(slot), self.net
        net.fill_cross_attention(batch.caches, rows, cond)
        hidden = net.embed(self._with_null_rows(batch.codes[slot : slot + 1, :, :start]))
        if cond.prefix is not None:
            hidden = torch.cat([cond.prefix, hidden], dim=1)
        hidden = net.forward(
            hidden + net.position(torch.arange(hidden.shape[1], device=self.device)), batch.caches, rows, None, None
        )
        noise = None if sampling.greedy else batch.noise[slot : slot + 1]
        self._write(
            self._choose(net.logits(hidden), sampling, noise),
            slice(slot, slot + 1),
            torch.tensor([start], device=self.device),
        )

    def decode_one_token(self, keys: int, sampling: Sampling) -> None:
        """For every slot of the batch: feed its token at `pos` (KV slot `cache_pos`), attend to the first
        `keys` slots of its own cache (masked past its own position), and write its next tokens at pos + 1."""
        batch, net = self._batch(), self.net
        tokens = batch.codes.gather(2, batch.pos.view(-1, 1, 1).expand(-1, self.num_codebooks, 1))  # (slots, K, 1)
        cache_pos = self._with_null_rows(batch.cache_pos)  # per row
        mask = (self.buffers.key_positions[:keys] <= cache_pos[:, None]).view(-1, 1, 1, keys)
        hidden = net.embed(self._with_null_rows(tokens)) + net.position(cache_pos)[:, None]
        hidden = net.forward(hidden, batch.caches, slice(None), cache_pos, mask)
        self._write(
            self._choose(net.logits(hidden), sampling, None if sampling.greedy else batch.noise),
            slice(None),
            batch.pos + 1,
        )

    def _choose(self, logits: torch.Tensor, sampling: Sampling, noise: torch.Tensor | None) -> torch.Tensor:
        """The next tokens per slot, (slots, K): guided (rows come in conditional/null pairs), then chosen."""
        if self.guided:
            logits = guide(logits, sampling.guidance_scale)
        return choose(logits, sampling, noise)

    def _write(self, chosen: torch.Tensor, slots: slice, write_pos: torch.Tensor) -> None:
        """Write the chosen tokens of `slots` at each slot's `write_pos`, keeping forced delay-pattern values."""
        codes = self._batch().codes[slots]
        index = write_pos.view(-1, 1, 1).expand(-1, self.num_codebooks, 1)
        forced = codes.gather(2, index)
        codes.scatter_(2, index, torch.where(forced == FREE, chosen.unsqueeze(2), forced))

    def _keys_to_read(self, filled: int) -> int:
        """A captured graph has one static shape: it reads every slot (masked). Eager steps read only the
        blocks holding the `filled` slots, which on the CPU saves reading the whole cache per step; whole
        blocks, because the attention kernel rounds a partial block differently (see the module doc)."""
        if self.compiled:
            return self.buffers.key_capacity
        return min(-(-filled // KEY_BLOCK) * KEY_BLOCK, self.buffers.key_capacity)

    def _rows_of(self, slot: int) -> slice:
        """The cache rows of a slot: its conditional row and, with guidance, its null row right after it."""
        rows = 2 if self.guided else 1
        return slice(slot * rows, (slot + 1) * rows)

    def _with_null_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slot values per row: the null-conditioned row sees what its conditional row sees."""
        return x.repeat_interleave(2, dim=0) if self.guided else x
