"""MusicGen's decoder as plain PyTorch over the weights of a transformers MusicGen model: the conditioning,
the codebook embeddings, the pre-norm layers reading and writing a static KV cache, the codebook heads.

The numbers are transformers' own (the same weights, ops in the same order): greedy decoding through
mtm_bot.stages.musicgen_decode reproduces `generate` token for token. What differs is where the keys and values
live: in caches the caller allocates once (mtm_bot.stages.musicgen_slots), each block in its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Conditioning:
    """One block's conditioning rows: the conditional row and, with guidance, the null row after it."""

    prefix: torch.Tensor | None  # (R, L, d) states prepended to the decoder sequence (melody)
    cross_states: torch.Tensor | None  # (R, T, d) states the decoder cross-attends to (text-only family)
    cross_mask: torch.Tensor | None  # (R, T) bool, True where a cross-attention key may be used


@dataclass
class Caches:
    """The attention state of some rows: views into the decoder's static buffers."""

    k: torch.Tensor  # (layers, rows, heads, key capacity, head dim)
    v: torch.Tensor
    cross_k: torch.Tensor | None  # (layers, rows, heads, text capacity, head dim), text-only family
    cross_v: torch.Tensor | None
    cross_mask: torch.Tensor | None  # (rows, 1, 1, text capacity)


class MusicgenNet:
    """MusicgenMelodyForConditionalGeneration's or MusicgenForConditionalGeneration's decoder."""

    def __init__(self, model) -> None:
        from transformers.activations import ACT2FN

        self.model = model
        decoder = model.decoder  # MusicgenForCausalLM / MusicgenMelodyForCausalLM
        self.stack = decoder.model.decoder  # embeddings, layers, final layer norm
        config = decoder.config
        self.num_codebooks = config.num_codebooks
        self.channels = config.audio_channels  # 2: the codebooks interleave left and right (L0 R0 L1 R1 ...)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.vocab_size = decoder.lm_heads[0].out_features
        self.activation = ACT2FN[config.activation_function]
        # The melody family prepends its conditioning to the sequence; the text-only family cross-attends to it.
        self.prefix_conditioning = not hasattr(self.stack.layers[0], "encoder_attn")
        self.chroma_length = model.config.chroma_length if self.prefix_conditioning else 0
        self.positions = self.stack.embed_positions.weights.shape[0]
        self.device = decoder.lm_heads[0].weight.device
        self.dtype = decoder.lm_heads[0].weight.dtype
        self.qkv_weights, self.heads_weight = _fuse_projections(self.stack.layers, decoder.lm_heads)

    def condition(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, input_features: torch.Tensor | None, guided: bool
    ) -> Conditioning:
        """The conditional rows and, `guided`, the null rows after them (what transformers builds)."""
        model = self.model
        text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if hasattr(model, "enc_to_dec_proj"):
            text = model.enc_to_dec_proj(text)
        mask = attention_mask.bool()
        if guided:  # the null condition is all-zero text states with an all-zero mask
            text = torch.cat([text, torch.zeros_like(text)])
        row_mask = torch.cat([mask, torch.zeros_like(mask)]) if guided else mask
        text = text * row_mask[..., None].to(text.dtype)  # padding states are zeroed, as in transformers
        if not self.prefix_conditioning:
            # Null rows have all-zero keys and values: attending to them contributes exactly zero,
            # so they may use every key (an all-masked row would be NaN in SDPA).
            cross_mask = torch.cat([mask, torch.ones_like(mask)]) if guided else mask
            return Conditioning(None, text, cross_mask)

        # Chroma: the null melody is a one-hot on the first bin; without a melody both rows use it.
        null = torch.zeros(
            input_ids.shape[0],
            1 if input_features is None else input_features.shape[1],
            model.config.num_chroma,
            device=self.device,
            dtype=self.dtype,
        )
        null[:, :, 0] = 1
        chroma = null if input_features is None else input_features.to(self.dtype)
        if guided:
            chroma = torch.cat([chroma, null])
        if hasattr(model, "audio_enc_to_dec_proj"):
            chroma = model.audio_enc_to_dec_proj(chroma)
        repeats = -(-self.chroma_length // chroma.shape[1])  # tile short melodies, cut long ones
        chroma = chroma.repeat(1, repeats, 1)[:, : self.chroma_length]
        return Conditioning(torch.cat([chroma, text], dim=1), None, None)

    def fill_cross_attention(self, caches: Caches, rows: slice, cond: Conditioning) -> None:
        """Cross-attention keys and values over a block's text, computed once per block into its rows."""
        if cond.cross_states is None or cond.cross_mask is None:
            return
        assert caches.cross_k is not None and caches.cross_v is not None and caches.cross_mask is not None
        text_len = cond.cross_states.shape[1]
        for buffer in (caches.cross_k, caches.cross_v):
            buffer[:, rows] = 0
        caches.cross_mask[rows] = False
        caches.cross_mask[rows, 0, 0, :text_len] = cond.cross_mask
        for i, layer in enumerate(self.stack.layers):
            caches.cross_k[i, rows, :, :text_len] = self._split_heads(layer.encoder_attn.k_proj(cond.cross_states))
            caches.cross_v[i, rows, :, :text_len] = self._split_heads(layer.encoder_attn.v_proj(cond.cross_states))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(R, K, S) codes -> (R, S, d): the sum of the K codebook embeddings (in transformers' order, for
        identical rounding)."""
        return sum(self.stack.embed_tokens[k](tokens[:, k]) for k in range(self.num_codebooks))

    def position(self, positions: torch.Tensor) -> torch.Tensor:
        """The sinusoidal embedding of `positions`, added to the whole sequence, conditioning prefix included."""
        return self.stack.embed_positions.weights[positions]

    def forward(
        self,
        hidden: torch.Tensor,
        caches: Caches,
        rows: slice,
        cache_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Pre-norm decoder layers over the cache rows `rows`. A prefill (`cache_pos` None) is causal
        attention over its own sequence from cache slot 0; a step writes each row's one token at its
        `cache_pos` and attends to the cache under `mask`."""
        for i, layer in enumerate(self.stack.layers):
            hidden = hidden + self._self_attention(
                i, layer.self_attn, layer.self_attn_layer_norm(hidden), caches, rows, cache_pos, mask
            )
            if not self.prefix_conditioning:
                hidden = hidden + self._cross_attention(
                    i, layer.encoder_attn, layer.encoder_attn_layer_norm(hidden), caches, rows
                )
            hidden = hidden + layer.fc2(self.activation(layer.fc1(layer.final_layer_norm(hidden))))
        return self.stack.layer_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, S, d) -> (R, K, V) of the last position, float32 like generate."""
        return F.linear(hidden[:, -1], self.heads_weight).view(hidden.shape[0], self.num_codebooks, -1).float()

    def _self_attention(
        self,
        i: int,
        attn,
        x: torch.Tensor,
        caches: Caches,
        rows: slice,
        cache_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = (self._split_heads(part) for part in F.linear(x, self.qkv_weights[i]).chunk(3, dim=-1))
        k_cache, v_cache = caches.k[i, rows], caches.v[i, rows]
        if cache_pos is None or mask is None:
            k_cache[:, :, : k.shape[2]] = k
            v_cache[:, :, : v.shape[2]] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        else:
            index = cache_pos.view(-1, 1, 1, 1).expand_as(k)  # each row's own cache slot
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            keys = mask.shape[-1]
            out = F.scaled_dot_product_attention(
                q, k_cache[:, :, :keys], v_cache[:, :, :keys], attn_mask=mask, scale=attn.scaling
            )
        return attn.out_proj(self._merge_heads(out))

    def _cross_attention(self, i: int, attn, x: torch.Tensor, caches: Caches, rows: slice) -> torch.Tensor:
        assert caches.cross_k is not None and caches.cross_v is not None and caches.cross_mask is not None
        q = self._split_heads(attn.q_proj(x))
        out = F.scaled_dot_product_attention(
            q, caches.cross_k[i, rows], caches.cross_v[i, rows], attn_mask=caches.cross_mask[rows], scale=attn.scaling
        )
        return attn.out_proj(self._merge_heads(out))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, S, d) -> (R, H, S, D)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # (R, H, S, D) -> (R, S, d)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


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
        linear.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused
