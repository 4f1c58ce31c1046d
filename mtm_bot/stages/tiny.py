"""Offline building blocks for the `tiny` profile: small tokenizers trained on a built-in corpus, and the
refiner's tiny Llama.

The tiny profile exercises the real architectures and code paths with random weights, so tests and
CI run without any download. Output is noise; shapes, dtypes and control flow are the real ones.
"""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_CORPUS = [
    "a warm jazz carol with sleigh bells, upright bass and brushed drums at 96 bpm",
    "an upbeat electronic track with a punchy kick, bright synth pads and a catchy lead melody",
    "a slow acoustic guitar ballad, soft female vocals, mellow and intimate",
    "festive orchestral music with strings, horns, glockenspiel and choir, joyful and grand",
    "lo-fi hip hop beat with vinyl crackle, jazzy piano chords and a relaxed groove",
    "energetic rock song with distorted electric guitars, loud drums and bass",
    "the low quality recording features a piano melody played over a steady beat",
    "style mood tempo instruments dynamics caption segment start end crescendo quiet loud",
    '{"style": "jazz", "mood": "cosy", "tempo_bpm": 96, "instruments": ["piano", "bells"], '
    '"dynamics": "soft", "segments": [{"start": "0:00", "end": "0:10", "caption": "text"}]}',
    "0 1 2 3 4 5 6 7 8 9 10 20 30 60 90 120 180 : , . ! ? ' \" { } [ ] - _ / \\ é ü ñ ß 音楽 🎄",
    "You are a music producer. Rewrite each caption so it follows the user's instruction.",
]


@cache
def byte_level_bpe(vocab_size: int, special_tokens: tuple[str, ...]) -> Tokenizer:
    """A byte-level BPE (GPT-2/BART/Llama-3 family) that can encode any UTF-8 text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


# --- The refiner's LLM: Llama architecture, random weights ------------------------------------------

TINY_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Llama 3's chat format (header tokens, <|eot_id|> after each turn).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_tokenizer():
    """The tiny LLM's tokenizer: 512 byte-level BPE tokens, Llama 3's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    shared = byte_level_bpe(512, TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(shared.to_str()),  # a copy: the cached one is shared
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


def build_tiny_llm(
    tokenizer,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    stop_tokens: tuple[str, ...] = ("<|eot_id|>",),
):
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, GQA like Llama 3), randomly initialised in `dtype`
    the way from_pretrained builds one (RoPE's buffers stay float32). `vocab_size`: its logits, when they
    differ from the tokenizer's length (Llama 3.2's real tokenizer has one token beyond them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    stop = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop[0] if len(stop) == 1 else stop,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = stop
    return model
