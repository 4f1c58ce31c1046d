"""The static buffers MusicGen decodes in, allocated once: KV caches, the delay-pattern codes, each slot's
positions and noise, and their views per batch-size bucket.

A *slot* holds one block while it decodes: its rows of the caches (with classifier-free guidance, a
conditional row and the null-conditioned row after it), its row of the delay-pattern buffer, its position.
A *bucket* is the first 1, 2, 4, … slots: views of the same memory, each marked static, so a compiled
step specialises on each bucket's shapes (one CUDA graph per bucket) and a running loop can move to a
larger bucket without moving any block.

The delay pattern (codebook k runs k steps behind codebook 0; in a stereo checkpoint, whose codebooks
interleave left and right, L0 R0 L1 R1 ..., the pair k runs k steps behind) lives in `codes` (slots, K,
capacity): positions the model must not choose (start/end padding, the audio prompt) hold their fixed
value, positions to sample hold FREE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .musicgen_net import Caches, MusicgenNet

FREE = -1  # a delay-pattern slot the model samples; every other value is forced
TEXT_BUCKET = 128  # text capacity is a whole number of these
KEY_BLOCK = 64  # key capacity is a whole number of these (eager steps read the cache in whole blocks)


@dataclass
class Slots:
    """One bucket's views of the buffers."""

    caches: Caches
    codes: torch.Tensor  # (slots, K, token capacity) the delay-pattern buffer
    pos: torch.Tensor  # (slots,) position of each slot's newest token (fed to the next step)
    cache_pos: torch.Tensor  # (slots,) its KV cache slot: pos + the slot's prefix length
    active: torch.Tensor  # (slots,) 1 while a block decodes in the slot, else 0 (its position stays 0)
    noise: torch.Tensor  # (slots, K, V) this step's exponential noise, drawn per slot from its generator

    def tensors(self) -> list[torch.Tensor]:
        views = [
            self.caches.k,
            self.caches.v,
            self.caches.cross_k,
            self.caches.cross_v,
            self.caches.cross_mask,
            self.codes,
            self.pos,
            self.cache_pos,
            self.active,
            self.noise,
        ]
        return [t for t in views if t is not None]


class SlotBuffers:
    def __init__(self, net: MusicgenNet, max_frames: int, max_text_tokens: int, pad_token_id: int) -> None:
        self.net = net
        self.pad_token_id = pad_token_id  # also the decoder start token
        self.delays = [k // net.channels for k in range(net.num_codebooks)]  # codebook k runs this far behind
        self.steps_behind = self.delays[-1]  # the last codebooks' delay: a block's extra decode steps
        self.text_capacity = -(-max_text_tokens // TEXT_BUCKET) * TEXT_BUCKET
        self.token_capacity = max_frames + 1 + self.steps_behind  # start token + frames + delay tail
        prefix_capacity = net.chroma_length + self.text_capacity if net.prefix_conditioning else 0
        if prefix_capacity + self.token_capacity > net.positions:
            raise ValueError(
                f"{max_text_tokens} text tokens + max_frames={max_frames} exceed the model's "
                f"{net.positions} positions; lower max_text_tokens or max_frames"
            )
        self.key_capacity = -(-(prefix_capacity + self.token_capacity) // KEY_BLOCK) * KEY_BLOCK
        self.key_positions = torch.arange(self.key_capacity, device=net.device)
        # It keeps its address for the decoder's life: marked static, a CUDA graph reads it in place.
        torch._dynamo.mark_static_address(self.key_positions)
        self.allocated: tuple[int, bool] | None = None  # (slots, guided) of the buffers
        self.buckets: dict[int, Slots] = {}  # slots -> that bucket's views

    def allocate(self, slots: int, guided: bool) -> None:
        """Buffers for `slots` blocks; kept (never shrunk) while guidance matches. Reallocating drops the
        buffers' contents: only between loops."""
        if self.allocated is not None and self.allocated[1] == guided and slots <= self.allocated[0]:
            return
        net = self.net
        rows = slots * (2 if guided else 1)  # guidance: each slot's conditional row, then its null row
        layers, shape = len(net.stack.layers), (rows, net.num_heads, self.key_capacity, net.head_dim)
        kw = dict(device=net.device, dtype=net.dtype)
        self.k_cache = torch.zeros(layers, *shape, **kw)
        self.v_cache = torch.zeros(layers, *shape, **kw)
        self.codes = torch.full(
            (slots, net.num_codebooks, self.token_capacity), self.pad_token_id, dtype=torch.long, device=net.device
        )
        self.pos = torch.zeros(slots, dtype=torch.long, device=net.device)
        self.cache_pos = torch.zeros_like(self.pos)
        self.active = torch.zeros_like(self.pos)
        self.noise = torch.ones(slots, net.num_codebooks, net.vocab_size, device=net.device)
        self.cross_k = self.cross_v = self.cross_mask = None
        if not net.prefix_conditioning:
            cross_shape = (rows, net.num_heads, self.text_capacity, net.head_dim)
            self.cross_k = torch.zeros(layers, *cross_shape, **kw)
            self.cross_v = torch.zeros(layers, *cross_shape, **kw)
            # An idle slot attends to all-zero keys and values: output zero, not the NaN of an all-masked row.
            self.cross_mask = torch.ones(rows, 1, 1, self.text_capacity, dtype=torch.bool, device=net.device)
        self.buckets = {}
        bucket = 1
        while bucket <= slots:
            self.buckets[bucket] = self._views(bucket, bucket * (2 if guided else 1))
            bucket *= 2
        self.allocated = (slots, guided)

    def _views(self, slots: int, rows: int) -> Slots:
        cross: tuple[torch.Tensor | None, ...] = (None, None, None)
        if self.cross_k is not None and self.cross_v is not None and self.cross_mask is not None:
            cross = (self.cross_k[:, :rows], self.cross_v[:, :rows], self.cross_mask[:rows])
        views = Slots(
            Caches(self.k_cache[:, :rows], self.v_cache[:, :rows], *cross),
            self.codes[:slots],
            self.pos[:slots],
            self.cache_pos[:slots],
            self.active[:slots],
            self.noise[:slots],
        )
        for tensor in views.tensors():
            torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static(tensor)
        return views

    def lay_out(self, batch: Slots, slot: int, prompt_codes: torch.Tensor | None, steps: int) -> None:
        """The slot's delay pattern. Codebook k, delayed by d: d + 1 start pads, the prompt, free slots, then
        pads to the end (as transformers' build_delay_pattern_mask)."""
        pad, codes = self.pad_token_id, batch.codes[slot]
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[-1]
        end = 1 + prompt_frames + steps  # sequence length, start token included
        codes.fill_(FREE)
        for k, d in enumerate(self.delays):
            codes[k, : d + 1] = pad
            if prompt_codes is not None:
                codes[k, d + 1 : d + 1 + prompt_frames] = prompt_codes[0, k].to(codes.device)
            codes[k, end - self.steps_behind + d : end] = pad

    def take_codes(self, batch: Slots, slot: int, frames: int) -> torch.Tensor:
        """The slot's frames (1, K, frames), delay pattern undone."""
        codes = batch.codes[slot]
        return torch.stack([codes[k, d + 1 : d + 1 + frames] for k, d in enumerate(self.delays)])[None]

    def release(self, batch: Slots, slot: int) -> None:
        """Idle the slot: it keeps decoding its start token at position 0 (a captured graph runs every
        slot), writing only into its own rows, which the next block in the slot overwrites."""
        batch.codes[slot].fill_(self.pad_token_id)
        batch.pos[slot] = 0
        batch.cache_pos[slot] = 0
        batch.active[slot] = 0
        batch.noise[slot].fill_(1)
