"""Jump-forward feeds the LLM forced text split the way its own tokenizer splits it (Llama 3.2's real
vocabulary; tiny random weights).

The model learned from canonically tokenized text: after `"` its tokenizer writes `",` where the grammar
forces `, "`, so a forced run that starts with a lone `,` is input the model never saw in training.
"""

from __future__ import annotations

import pytest
import torch

import mtm_bot.stages.refiner as refiner_module
from bench.llama3_vocab import build_llama3_tokenizer, build_tiny_llama3
from mtm_bot.stages.captioner import Segment
from mtm_bot.stages.compiling import EAGER
from mtm_bot.stages.refiner import Refiner

SEGMENTS = [
    Segment(0.0, 10.0, "a piano melody over a steady beat"),
    Segment(10.0, 20.0, "energetic drums and distorted guitars"),
    Segment(20.0, 25.0, "a quiet outro with soft strings"),
]


@pytest.fixture(scope="module")
def llama3():
    tokenizer = build_llama3_tokenizer()
    return Refiner(build_tiny_llama3(tokenizer), tokenizer, torch.device("cpu"), compile=EAGER)


def _forced_runs(refiner: Refiner, monkeypatch, seeds) -> list[list[int]]:
    """Every multi-token pass after the prompt: the model's chosen token and the forced run after it."""
    runs = []
    real_prefill = refiner_module.prefill

    def recording_prefill(model, tokens, cache, start=0):
        if start > 0:
            runs.append(tokens[0].tolist())
        return real_prefill(model, tokens, cache, start)

    monkeypatch.setattr(refiner_module, "prefill", recording_prefill)
    for seed in seeds:
        for count in (1, 3):
            refiner.refine(SEGMENTS[:count], "make it a cosy jazz carol with sleigh bells", seed=seed)
    return runs


def test_forced_runs_are_tokenized_as_the_tokenizer_would(llama3, monkeypatch):
    runs = _forced_runs(llama3, monkeypatch, seeds=range(3))
    assert len(runs) >= 10  # jump-forward did run: keys and punctuation between the strings
    tokenizer = llama3.tokenizer
    for run in runs:
        text = tokenizer.decode(run, clean_up_tokenization_spaces=False)
        assert tokenizer.encode(text, add_special_tokens=False) == run, repr(text)


def test_the_quote_that_opens_a_value_is_left_to_the_model(llama3, monkeypatch):
    """The grammar forces ` "` before every value string, but the tokenizer may join it with the value's
    first characters: a run ends before it, and the model writes it (alone, or with its first word)."""
    runs = _forced_runs(llama3, monkeypatch, seeds=[0])
    tokenizer = llama3.tokenizer
    endings = [tokenizer.decode(run[-1:], clean_up_tokenization_spaces=False) for run in runs]
    assert endings and not any(ending in (' "', ' ["') for ending in endings), endings
