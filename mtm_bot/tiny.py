"""Offline building blocks for the `tiny` profile: small tokenizers trained on a built-in corpus.

The tiny profile exercises the real architectures and code paths with random weights, so tests and
CI run without any download. Output is noise; shapes, dtypes and control flow are the real ones.
"""
from __future__ import annotations

from functools import lru_cache

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


@lru_cache(maxsize=None)
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
