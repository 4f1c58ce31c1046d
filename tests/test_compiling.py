"""MTM_COMPILE: a compile or capture that fails at warm-up is one warning and an eager stage, not a crash.

The failure is forced for real: torch.compile traces the decode step with dynamo and hands the graph
to a backend that fails the way a broken compiler toolchain does.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from synth import music

from mtm_bot.core.audio import Audio
from mtm_bot.stages.captioner import Segment
from mtm_bot.stages.compiling import EAGER, CompilePlan
from mtm_bot.stages.generator import SAMPLE_RATE, Block, Generator
from mtm_bot.stages.refiner import Refiner

CPU = torch.device("cpu")
AUTO_ON_CUDA = CompilePlan(enabled=True, required=False)  # what `auto` resolves to on a GPU
ON = CompilePlan(enabled=True, required=True)


@pytest.fixture
def broken_compiler(monkeypatch):
    """torch.compile whose backend fails; records each compiled call so the test sees it was tried."""
    real_compile = torch.compile
    tried = []

    def broken_backend(graph_module, example_inputs):
        tried.append(graph_module)
        raise RuntimeError("ptxas fatal: Value 'sm_120' is not defined for option 'gpu-name'")

    def compile_with_broken_backend(fn, mode=None, fullgraph=False):
        return real_compile(fn, backend=broken_backend, fullgraph=fullgraph)

    monkeypatch.setattr(torch, "compile", compile_with_broken_backend)
    return tried


def _one_block(generator: Generator) -> np.ndarray:
    clip = Audio(music(2.0, SAMPLE_RATE, seed=2), SAMPLE_RATE)
    return generator.generate(clip, [Block(0, 0.0, 1.0, 0, 0.0, 1.0, "warm jazz")], seed=4).audio.samples


def test_musicgen_falls_back_to_eager_with_one_warning(broken_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="mtm_bot.stages.compiling"):
        generator = Generator.load("tiny", "facebook/musicgen-melody", CPU, 1, compile=AUTO_ON_CUDA)
    assert broken_compiler, "the warm-up never tried to compile"
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtm_bot.stages.compiling"]
    assert len(warnings) == 1 and "MusicGen" in warnings[0] and "eager" in warnings[0] and "ptxas" in warnings[0]
    assert not generator.decoder.compiled
    eager = Generator.load("tiny", "facebook/musicgen-melody", CPU, 1, compile=EAGER)
    np.testing.assert_array_equal(_one_block(generator), _one_block(eager))  # serves, same music


def test_musicgen_compile_failure_is_an_error_when_compiling_is_required(broken_compiler):
    with pytest.raises(Exception, match="ptxas"):
        Generator.load("tiny", "facebook/musicgen-melody", CPU, 1, compile=ON)


def test_refiner_falls_back_to_eager_with_one_warning(broken_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="mtm_bot.stages.compiling"):
        refiner = Refiner.load("tiny", "unused", CPU, compile=AUTO_ON_CUDA)
    assert broken_compiler
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtm_bot.stages.compiling"]
    assert len(warnings) == 1 and "refiner" in warnings[0] and "ptxas" in warnings[0]
    segments = [Segment(0.0, 10.0, "a piano melody")]
    eager = Refiner.load("tiny", "unused", CPU, compile=EAGER)
    assert refiner.refine(segments, "make it jazz", seed=2) == eager.refine(segments, "make it jazz", seed=2)


def test_refiner_compile_failure_is_an_error_when_compiling_is_required(broken_compiler):
    with pytest.raises(Exception, match="ptxas"):
        Refiner.load("tiny", "unused", CPU, compile=ON)
