"""MusicGen generation: plan output blocks, compute melody chroma, generate block by block, join seamlessly."""
from __future__ import annotations

import torch

TINY_CODEBOOK_SIZE = 64


def build_tiny_musicgen(kind: str = "melody"):
    """A tiny, randomly initialised MusicGen ("melody" or "small") and its tokenizer, built offline.

    Same architectures and audio framing as the real checkpoints (32 kHz, EnCodec at 50 frames/s with
    4 codebooks, one-step delay pattern), small enough to run a 30 s block on a CPU in seconds.
    """
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
        PreTrainedTokenizerFast,
        T5Config,
    )

    from .tiny import byte_level_bpe

    if kind not in ("melody", "small"):
        raise ValueError(f"kind must be 'melody' or 'small', not {kind!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(512, ("<pad>", "</s>", "<unk>")),
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
    )
    text_config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    # frame_rate = 32000 / prod(upsampling_ratios) = 50; num_quantizers = 1000 * bandwidth // (50 * log2(64)) = 4.
    audio_config = EncodecConfig(
        sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.25], codebook_size=TINY_CODEBOOK_SIZE,
        hidden_size=16, num_filters=4, num_lstm_layers=1, num_residual_layers=1, normalize=False,
    )
    decoder_kwargs = dict(
        vocab_size=TINY_CODEBOOK_SIZE, pad_token_id=TINY_CODEBOOK_SIZE, bos_token_id=TINY_CODEBOOK_SIZE,
        num_codebooks=4, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=2048, dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "melody":
            config = MusicgenMelodyConfig(
                text_encoder=text_config, audio_encoder=audio_config,
                decoder=MusicgenMelodyDecoderConfig(**decoder_kwargs),
            )
            model = MusicgenMelodyForConditionalGeneration(config)
        else:
            config = MusicgenConfig(
                text_encoder=text_config, audio_encoder=audio_config, decoder=MusicgenDecoderConfig(**decoder_kwargs),
            )
            model = MusicgenForConditionalGeneration(config)
        # Random init leaves EnCodec's codebooks at zero: every code would decode to the same sound.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    # The same generation defaults as the hub checkpoints (sampling, top-k 250, CFG 3, 30 s context).
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = TINY_CODEBOOK_SIZE
    gen.do_sample, gen.top_k, gen.guidance_scale, gen.max_length = True, 250, 3.0, 1500
    return model.eval(), tokenizer
