"""The pipeline as the bot and the CLI use it: one object, models loaded once, tiny profile."""

import numpy as np
import pytest
from synth import music

from mtm_bot.core.audio import Audio, integrated_loudness, true_peak_dbfs
from mtm_bot.core.errors import Cancelled, InputError
from mtm_bot.core.progress import CancelToken
from mtm_bot.core.settings import Settings
from mtm_bot.stages.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline(Settings(profile="tiny", device="cpu")).load()


@pytest.fixture(scope="module")
def clip():
    return Audio(music(14.0, rate=22050), 22050)


def test_same_seed_reproduces_the_whole_result_and_another_seed_changes_it(pipeline, clip):
    first = pipeline.compose(clip, "a cosy jazz carol", seed=11)
    again = pipeline.compose(clip, "a cosy jazz carol", seed=11)
    other = pipeline.compose(clip, "a cosy jazz carol", seed=12)
    assert np.array_equal(first.audio.samples, again.audio.samples)
    assert first.caption_lines() == again.caption_lines()
    assert not np.array_equal(first.audio.samples, other.audio.samples)


def test_track_is_exact_length_loudness_normalised_and_below_full_scale(pipeline, clip):
    result = pipeline.compose(clip, "festive carol with sleigh bells", duration=20, seed=1)
    assert result.audio.sample_rate == 32000 and len(result.audio.samples) == 20 * 32000
    loudness, peak = integrated_loudness(result.audio), true_peak_dbfs(result.audio)
    assert peak <= -1.0 + 0.05  # true peak kept below -1 dBFS
    # At the -14 LUFS target, unless reaching it would have pushed the peak over the limit.
    assert loudness == pytest.approx(-14.0, abs=0.5) or (loudness < -14.0 and peak == pytest.approx(-1.0, abs=0.1))
    assert [b.segment for b in result.blocks] == [0, 1]  # a 14 s clip has two segments
    assert result.caption_lines()[1].startswith("0:10\u20130:20 ")


def test_refined_captions_arrive_before_generation_starts(pipeline, clip):
    events = []
    pipeline.compose(
        clip,
        "lo-fi",
        duration=10,
        seed=2,
        on_captions=lambda lines: events.append(("captions", lines)),
        progress=lambda p: events.append((p.stage, p.block)),
    )
    stages = [name for name, _ in events]
    assert stages.index("captions") > stages.index("refining")
    assert stages.index("captions") < stages.index("generating")
    captions = dict(events)["captions"]
    assert len(captions) == 1 and captions[0].startswith("0:00\u20130:10 ")


class GeneratorSpy:
    """The loaded generator, counting how often generation was started."""

    def __init__(self, generator) -> None:
        self.generator = generator
        self.calls = 0

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.generator.generate(*args, **kwargs)


def test_cancel_while_refining_stops_the_job_before_generation_starts(pipeline, clip):
    spy = GeneratorSpy(pipeline.generator)
    spied = Pipeline(pipeline.settings, captioner=pipeline.captioner, refiner=pipeline.refiner, generator=spy)
    token, captions = CancelToken(), []

    def cancel_once_refining(progress):
        if progress.stage == "refining":
            token.cancel()

    with pytest.raises(Cancelled):
        spied.compose(clip, "carol", seed=3, progress=cancel_once_refining, cancel=token, on_captions=captions.append)
    # The refiner stopped at its next decode step: no refined captions went out, no block was generated.
    assert captions == [] and spy.calls == 0


@pytest.mark.parametrize("duration", [5, 181])
def test_duration_outside_the_limits_is_refused(pipeline, clip, duration):
    with pytest.raises(InputError, match="between 10 and 180"):
        pipeline.compose(clip, "carol", duration=duration)


def test_the_llm_loads_warms_up_and_answers_every_job_on_one_thread_of_its_own(monkeypatch, clip):
    """Its compiled step is captured at load; torch keeps CUDA graph trees per thread, so a refinement
    on a job's own thread would record the graph again. Jobs' threads hand their refinements to it."""
    import threading

    from mtm_bot.stages.refiner import Refiner

    threads = []
    load = Refiner.load.__func__

    def recording_load(cls, *args, **kwargs):
        threads.append(("load", threading.get_ident()))
        refiner = load(cls, *args, **kwargs)
        for name in ("refine", "write"):
            method = getattr(refiner, name)
            setattr(
                refiner,
                name,
                lambda *a, _m=method, _n=name, **kw: (threads.append((_n, threading.get_ident())), _m(*a, **kw))[1],
            )
        return refiner

    monkeypatch.setattr(Refiner, "load", classmethod(recording_load))
    pipeline = Pipeline(Settings(profile="tiny", device="cpu"))
    jobs = [
        threading.Thread(target=pipeline.compose, args=(clip, "a carol"), kwargs={"duration": 10}),
        threading.Thread(target=pipeline.compose, args=(None, "a waltz"), kwargs={"duration": 10}),
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert sorted(name for name, _ in threads) == ["load", "refine", "write"]
    assert len({ident for _, ident in threads}) == 1
    assert threads[0][1] not in {job.ident for job in jobs} | {threading.get_ident()}
