"""A fast MusicGen decode loop (gpt-fast style) over the weights of a transformers MusicGen model.

transformers' `generate` grows a dynamic KV cache, rebuilds masks and runs a dozen logits processors
in Python on every step. Here the same decoder runs as plain PyTorch over a static KV cache that is
allocated once per block shape, so one decode step is a fixed sequence of kernels: on CUDA it is
compiled with `mode="reduce-overhead"` (one CUDA graph per step); on the CPU it runs eager.

What the loop does for one block (B clips, K codebooks, classifier-free guidance on):
1. conditioning, computed once: T5 states of the description (and, for musicgen-melody, the
   projected chroma), plus the null conditioning, stacked as one batch of 2B rows;
2. `prefill`: one forward pass over [melody prefix] + start token + audio prompt, which fills the
   self-attention cache (and, for musicgen-small, the cross-attention K/V over the T5 states);
3. `decode_one_token` per step: feed the last token of every codebook, guide, sample, and write the
   next token into the delay-pattern buffer; no host sync anywhere in the loop.

The delay pattern (codebook k runs k steps behind codebook 0) lives in one buffer `codes` of shape
(B, K, capacity): positions the model must not choose (start/end padding, the audio prompt) hold
their fixed value, positions to sample hold -1. Greedy decoding reproduces transformers'
`generate(do_sample=False)` token for token (tests/test_musicgen_decode.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FREE = -1  # a delay-pattern slot the model samples; every other value is forced
TEXT_BUCKET = 128  # text lengths are rounded up to this, so one captured graph serves every caption


@dataclass(frozen=True)
class Sampling:
    guidance_scale: float = 3.0  # classifier-free guidance; <= 1 turns it off (no null batch)
    top_k: int = 250  # 0 = no top-k filter
    top_p: float = 0.0  # 0 = no nucleus filter
    temperature: float = 1.0
    greedy: bool = False  # argmax instead of sampling (used by the equivalence tests)

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 <= self.top_p <= 1:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclass
class _Conditioning:
    prefix: torch.Tensor | None  # (R, L, d) states prepended to the decoder sequence (melody)
    cross_states: torch.Tensor | None  # (R, T, d) states the decoder cross-attends to (small)
    cross_mask: torch.Tensor | None  # (R, T) bool, True where a cross-attention key may be used


class MusicgenDecoder:
    """Decodes MusicGen codes for MusicgenMelodyForConditionalGeneration and MusicgenForConditionalGeneration."""

    def __init__(self, model, max_frames: int = 1500, compile: bool | None = None) -> None:
        self.model = model
        decoder = model.decoder  # MusicgenForCausalLM / MusicgenMelodyForCausalLM
        self.stack = decoder.model.decoder  # embeddings, layers, final layer norm
        self.heads = decoder.lm_heads
        config = decoder.config
        self.num_codebooks = config.num_codebooks
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.pad_token_id = model.generation_config.pad_token_id  # also the decoder start token
        if config.audio_channels != 1:
            raise ValueError("Only mono MusicGen checkpoints are supported.")
        from transformers.activations import ACT2FN

        self.activation = ACT2FN[config.activation_function]
        # musicgen-melody prepends its conditioning to the sequence; musicgen-small cross-attends to it.
        self.prefix_conditioning = not hasattr(self.stack.layers[0], "encoder_attn")
        self.chroma_length = model.config.chroma_length if self.prefix_conditioning else 0
        self.max_frames = max_frames
        self.device = decoder.lm_heads[0].weight.device
        self.dtype = decoder.lm_heads[0].weight.dtype
        self.qkv_weights, self.heads_weight = _fuse_projections(self.stack.layers, self.heads)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = self.decode_one_token
        if compile:
            self.step = torch.compile(self.decode_one_token, mode="reduce-overhead", fullgraph=True)
        self._shape: tuple[int, bool, int] | None = None  # (batch, cfg, text capacity) of the buffers
        self.cfg = False  # whether the buffers hold null-conditioned rows

    def run_eager(self) -> None:
        """Decode with the plain step from now on (the fallback when compiling or capturing fails)."""
        self.step = self.decode_one_token
        self.compiled = False

    # ----------------------------------------------------------------------------------------------
    # Public interface

    @torch.no_grad()
    def generate_codes(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       input_features: torch.Tensor | None = None, prompt_codes: torch.Tensor | None = None,
                       new_frames: int, sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                       on_step: Callable[[int, int], None] | None = None) -> torch.LongTensor:
        """Codes (B, K, P + new_frames), delay pattern undone, the prompt's P frames included.

        `input_ids`/`attention_mask`: the tokenized descriptions (B, T). `input_features`: chroma
        (B, frames, 12), melody model only. `prompt_codes`: (B, K, P) EnCodec codes to continue.
        `on_step(frames_done, new_frames)` runs after every step that completes a frame (exactly
        `new_frames` calls); an exception it raises stops the loop and propagates.
        """
        batch, K = input_ids.shape[0], self.num_codebooks
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[-1]
        if new_frames < 1 or prompt_frames + new_frames > self.max_frames:
            raise ValueError(f"prompt + new frames must be 1..{self.max_frames}, got {prompt_frames} + {new_frames}")
        if input_features is not None and not self.prefix_conditioning:
            raise ValueError("input_features (chroma) need a musicgen-melody model")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"the generator must live on {self.device} (the noise is drawn there, per step)")
        steps = new_frames + K - 1  # the last codebook finishes K - 1 steps after the first
        cfg = sampling.guidance_scale > 1
        cond = self.condition(input_ids.to(self.device), attention_mask.to(self.device),
                              None if input_features is None else input_features.to(self.device), cfg)
        self._allocate(batch, cfg, input_ids.shape[1])
        self._fill_delay_pattern(prompt_codes, steps)
        noise = self._noise(batch, sampling, generator)

        start = 1 + prompt_frames  # start token + prompt: the first sampled position
        prefix_len = 0 if cond.prefix is None else cond.prefix.shape[1]
        self.prefill(self.codes[:, :, :start], cond, noise, sampling)
        pos = torch.tensor([start], device=self.device)  # the newest token, fed to the next step
        cache_pos = pos + prefix_len  # ... and its slot in the KV cache
        for step in range(1, steps + 1):  # prefill was step 1
            if step > 1:
                noise = self._noise(batch, sampling, generator)
                self.step(pos, cache_pos, noise, sampling, self._keys_to_read(prefix_len + start + step - 1))
                pos += 1
                cache_pos += 1
            if on_step is not None and step >= K:  # frame `step - K + 1` now has all K codebooks
                on_step(step - K + 1, new_frames)

        codes = self.codes[:, :, : start + steps]
        frames = prompt_frames + new_frames
        return torch.stack([codes[:, k, k + 1: k + 1 + frames] for k in range(K)], dim=1).clone()

    def warmup(self, text_tokens: int = 32, frames: int = 8) -> None:
        """Compile and capture the decode step for the bot's shapes (batch 1, CFG, default sampling).

        Both a melody-conditioned and a continued block use the same step graph: the buffers are
        sized by max_frames and the text bucket, not by the block.
        """
        input_ids = torch.zeros((1, text_tokens), dtype=torch.long, device=self.device)
        features = None
        if self.prefix_conditioning:
            features = torch.zeros(1, frames, self.model.config.num_chroma, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        for _ in range(3 if self.compiled else 1):  # compile, warm up, record the CUDA graph
            self.generate_codes(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                input_features=features, new_frames=frames, generator=generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------------------------------------
    # Conditioning, buffers

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  input_features: torch.Tensor | None, cfg: bool) -> _Conditioning:
        """The conditional rows and, with CFG, the null rows after them (what transformers builds)."""
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

    def _allocate(self, batch: int, cfg: bool, text_tokens: int) -> None:
        """Static buffers for one block shape; reused while batch and CFG match and the text fits its bucket."""
        if self._shape is not None and self._shape[:2] == (batch, cfg) and text_tokens <= self._shape[2]:
            return
        text_capacity = -(-text_tokens // TEXT_BUCKET) * TEXT_BUCKET
        token_capacity = self.max_frames + self.num_codebooks  # start token + frames + delay tail
        prefix_capacity = self.chroma_length + text_capacity if self.prefix_conditioning else 0
        positions = self.stack.embed_positions.weights.shape[0]
        if prefix_capacity + token_capacity > positions:
            raise ValueError(f"{text_tokens} text tokens + max_frames={self.max_frames} exceed the model's "
                             f"{positions} positions; truncate the description")
        capacity = -(-(prefix_capacity + token_capacity) // 64) * 64  # aligned for the fused SDPA kernels
        rows = batch * (2 if cfg else 1)  # CFG: conditional rows, then null rows
        layers, shape = len(self.stack.layers), (rows, self.num_heads, capacity, self.head_dim)
        kw = dict(device=self.device, dtype=self.dtype)
        self.k_cache = torch.zeros(layers, *shape, **kw)
        self.v_cache = torch.zeros(layers, *shape, **kw)
        self.key_positions = torch.arange(capacity, device=self.device)
        self.codes = torch.full((batch, self.num_codebooks, token_capacity), FREE, dtype=torch.long, device=self.device)
        static = [self.k_cache, self.v_cache, self.codes, self.key_positions]
        if not self.prefix_conditioning:
            cross_shape = (rows, self.num_heads, text_capacity, self.head_dim)
            self.cross_k = torch.zeros(layers, *cross_shape, **kw)
            self.cross_v = torch.zeros(layers, *cross_shape, **kw)
            self.cross_mask = torch.zeros(rows, 1, 1, text_capacity, dtype=torch.bool, device=self.device)
            static += [self.cross_k, self.cross_v, self.cross_mask]
        # These keep their address for the decoder's life: marked static, a CUDA graph reads and writes them
        # in place instead of copying them in and out on every replay (as it does the per-step inputs).
        for tensor in static:
            torch._dynamo.mark_static_address(tensor)
        self._shape = (batch, cfg, text_capacity)
        self.cfg = cfg

    def _fill_delay_pattern(self, prompt_codes: torch.Tensor | None, steps: int) -> None:
        """Codebook k: k + 1 start pads, the prompt, free slots, then pads to the end (as transformers)."""
        K, pad, codes = self.num_codebooks, self.pad_token_id, self.codes
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[-1]
        end = 1 + prompt_frames + steps  # sequence length, start token included
        codes.fill_(FREE)
        for k in range(K):
            codes[:, k, : k + 1] = pad
            if prompt_codes is not None:
                codes[:, k, k + 1: k + 1 + prompt_frames] = prompt_codes[:, k].to(self.device)
            codes[:, k, end - K + 1 + k: end] = pad

    def _noise(self, batch: int, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor | None:
        """Exponential noise for one step (sample = argmax(probs / noise)), drawn from `generator`."""
        if sampling.greedy:
            return None
        shape = (batch, self.num_codebooks, self.heads[0].out_features)
        return torch.empty(shape, device=self.device).exponential_(generator=generator)

    # ----------------------------------------------------------------------------------------------
    # The model

    def prefill(self, tokens: torch.Tensor, cond: _Conditioning, noise: torch.Tensor | None,
                sampling: Sampling) -> None:
        """One pass over [prefix] + start token + prompt: fills the caches, picks the next tokens."""
        if cond.cross_states is not None:  # cross-attention K/V over the text, computed once per block
            text_len = cond.cross_states.shape[1]
            for buffer in (self.cross_k, self.cross_v, self.cross_mask):
                buffer.zero_()
            self.cross_mask[:, 0, 0, :text_len] = cond.cross_mask
            for i, layer in enumerate(self.stack.layers):
                self.cross_k[i, :, :, :text_len] = self._split_heads(layer.encoder_attn.k_proj(cond.cross_states))
                self.cross_v[i, :, :, :text_len] = self._split_heads(layer.encoder_attn.v_proj(cond.cross_states))
        hidden = self._embed(self._with_null_rows(tokens))
        if cond.prefix is not None:
            hidden = torch.cat([cond.prefix, hidden], dim=1)
        positions = torch.arange(hidden.shape[1], device=self.device)
        hidden = self._forward(hidden + self.stack.embed_positions.weights[positions], positions, None)
        self._choose(self._logits(hidden), torch.tensor([tokens.shape[-1]], device=self.device), noise, sampling)

    def decode_one_token(self, pos: torch.Tensor, cache_pos: torch.Tensor, noise: torch.Tensor | None,
                         sampling: Sampling, keys: int) -> None:
        """Feed the tokens at `pos` (KV slot `cache_pos`), attend to the first `keys` slots of the
        cache, and write the chosen next tokens at pos + 1."""
        hidden = self._embed(self._with_null_rows(self.codes.index_select(2, pos)))
        mask = (self.key_positions[:keys] <= cache_pos).view(1, 1, 1, -1)
        hidden = self._forward(hidden + self.stack.embed_positions.weights[cache_pos], cache_pos, mask)
        self._choose(self._logits(hidden), pos + 1, noise, sampling)

    def _keys_to_read(self, filled: int) -> int:
        """A captured graph has one static shape: it reads every slot (masked). Eager steps read only
        the `filled` slots, which on the CPU saves reading the whole cache per step."""
        return self.k_cache.shape[3] if self.compiled else filled

    def _with_null_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The null-conditioned rows see the same audio tokens as the conditional ones."""
        return torch.cat([tokens, tokens]) if self.cfg else tokens

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sum of the K codebook embeddings (in transformers' order, for identical rounding)."""
        return sum(self.stack.embed_tokens[k](tokens[:, k]) for k in range(self.num_codebooks))

    def _forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pre-norm decoder layers; `mask` None means causal attention over a prefill from slot 0."""
        for i, layer in enumerate(self.stack.layers):
            hidden = hidden + self._self_attention(i, layer.self_attn, layer.self_attn_layer_norm(hidden),
                                                   positions, mask)
            if not self.prefix_conditioning:
                hidden = hidden + self._cross_attention(i, layer.encoder_attn, layer.encoder_attn_layer_norm(hidden))
            hidden = hidden + layer.fc2(self.activation(layer.fc1(layer.final_layer_norm(hidden))))
        return self.stack.layer_norm(hidden)

    def _self_attention(self, i: int, attn, x: torch.Tensor, positions: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (self._split_heads(part) for part in F.linear(x, self.qkv_weights[i]).chunk(3, dim=-1))
        self.k_cache[i].index_copy_(2, positions, k)
        self.v_cache[i].index_copy_(2, positions, v)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        else:
            keys = mask.shape[-1]
            out = F.scaled_dot_product_attention(q, self.k_cache[i, :, :, :keys], self.v_cache[i, :, :, :keys],
                                                 attn_mask=mask, scale=attn.scaling)
        return attn.out_proj(self._merge_heads(out))

    def _cross_attention(self, i: int, attn, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(attn.q_proj(x))
        out = F.scaled_dot_product_attention(q, self.cross_k[i], self.cross_v[i], attn_mask=self.cross_mask,
                                             scale=attn.scaling)
        return attn.out_proj(self._merge_heads(out))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, S, d) -> (R, H, S, D)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, H, S, D) -> (R, S, d)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (R, 1, d) -> (R, K, V), float32 like generate
        return F.linear(hidden[:, -1], self.heads_weight).view(hidden.shape[0], self.num_codebooks, -1).float()

    # ----------------------------------------------------------------------------------------------
    # Guidance and sampling

    def _choose(self, logits: torch.Tensor, write_pos: torch.Tensor, noise: torch.Tensor | None,
                sampling: Sampling) -> None:
        """Guide, filter and sample the next tokens; keep forced delay-pattern values; write them to `codes`."""
        if self.cfg:
            cond, uncond = logits.split(logits.shape[0] // 2)
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
        forced = self.codes.index_select(2, write_pos).squeeze(2)
        self.codes.index_copy_(2, write_pos, torch.where(forced == FREE, chosen, forced).unsqueeze(2))


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
