"""Several jobs' MusicGen blocks decoded together, and their clips captioned together (mtm_bot.stages.batcher
through the generator and the captioner), tiny models, CPU.

A job's track depends only on its inputs and its seed: run alone or batched with others, the codes are
identical. Batches form from the blocks waiting when the decode thread is free; the tests hold that
thread until every job has handed in its first block, so the first batch really is shared.
"""

import dataclasses
import gc
import threading
import time
import weakref

import pytest
import torch

from mtm_bot.core.audio import Audio
from mtm_bot.core.errors import Cancelled
from mtm_bot.core.progress import CancelToken
from mtm_bot.stages.generator import Generator, plan_blocks
from tests.synth import music

SEGMENTS = [(0.0, 1.0), (1.0, 2.0)]


@pytest.fixture(scope="module")
def generator():
    return Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), 10, max_batch=4)


def blocks(duration, caption):
    return [dataclasses.replace(b, description=f"{caption} {b.segment}") for b in plan_blocks(duration, SEGMENTS, 1)]


# Different descriptions, with and without a melody, different lengths (the last one ends mid-block).
JOBS = [
    dict(clip=Audio(music(2.0, 32000, seed=1), 32000), blocks=blocks(3, "a cosy jazz carol"), seed=1),
    dict(clip=None, blocks=blocks(2, "an ambient drone with choir and a very long description " * 3), seed=2),
    dict(clip=Audio(music(2.0, 22050, seed=5), 22050), blocks=blocks(2.5, "brass"), seed=3),
]


def run_together(generator, jobs, cancel_tokens=None):
    """Each job in its own thread, as the worker runs them; the decode thread waits until every first
    block is in, so they start as one batch."""
    results: list = [None] * len(jobs)
    holding, hold = threading.Event(), threading.Event()

    def hold_the_decode_thread():
        holding.set()
        hold.wait()

    holder = threading.Thread(target=generator.batcher.call, args=(hold_the_decode_thread,))
    holder.start()
    holding.wait(60)

    def run(i, job):
        try:
            cancel = cancel_tokens[i] if cancel_tokens else None
            results[i] = generator.generate(job["clip"], job["blocks"], seed=job["seed"], cancel=cancel).codes
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(generator.batcher._waiting) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    hold.set()
    for thread in [holder, *threads]:
        thread.join(120)
    return results


@pytest.fixture(scope="module")
def alone(generator):
    return [generator.generate(job["clip"], job["blocks"], seed=job["seed"]).codes for job in JOBS]


def test_jobs_batched_together_get_the_codes_they_get_alone(generator, alone):
    generator.batcher.batch_sizes.clear()
    together = run_together(generator, JOBS)
    assert generator.batcher.batch_sizes[0] == 3  # the first blocks really shared one decode loop
    assert len(generator.batcher.batch_sizes) < sum(len(job["blocks"]) for job in JOBS)  # later ones joined loops
    for mine, theirs in zip(together, alone):
        assert torch.equal(mine, theirs)


def test_a_cancelled_job_leaves_the_batch_without_disturbing_the_others(generator, alone):
    class CancelAfter(CancelToken):
        def __init__(self, checks):
            super().__init__()
            self.checks = checks

        def check(self):
            self.checks -= 1
            if self.checks == 0:
                self.cancel()
            super().check()

    together = run_together(generator, JOBS, cancel_tokens=[None, CancelAfter(10), None])
    assert isinstance(together[1], Cancelled)
    assert torch.equal(together[0], alone[0]) and torch.equal(together[2], alone[2])


def test_out_of_memory_on_a_batch_retries_smaller_with_the_same_noise(generator, alone, monkeypatch):
    decoder = generator.decoder

    class SmallMemory:
        """The decoder, running out of memory on any loop of more than one block."""

        def decode_blocks(self, blocks, max_blocks=1, admit=None, **kwargs):
            if len(blocks) > 1:
                for request, _ in blocks:  # a real OOM strikes mid-loop, after some noise was drawn
                    torch.empty(4).exponential_(generator=request.generator)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return decoder.decode_blocks(blocks, max_blocks=max_blocks, admit=admit, **kwargs)

    monkeypatch.setattr(generator, "decoder", SmallMemory())
    together = run_together(generator, JOBS)
    for mine, theirs in zip(together, alone):
        assert torch.equal(mine, theirs)


def test_a_job_that_arrives_mid_block_joins_the_running_loop_at_once(generator, alone):
    """Continuous batching: the newcomer's first frame is out before the running block's last one."""
    events, results = [], {}
    first, second = JOBS[0], JOBS[2]

    def progress(name):
        def report(p):
            events.append((name, p.block, p.step, p.steps))
            if name == "first" and (p.block, p.step) == (1, 5):
                threading.Thread(target=run, args=("second", second)).start()

        return report

    def run(name, job):
        results[name] = generator.generate(job["clip"], job["blocks"], seed=job["seed"], progress=progress(name)).codes

    run("first", first)
    while "second" not in results:
        time.sleep(0.05)
    first_block_done = events.index(("first", 1, 50, 50))
    second_starts = next(i for i, e in enumerate(events) if e[0] == "second")
    assert second_starts < first_block_done
    assert torch.equal(results["first"], alone[0]) and torch.equal(results["second"], alone[2])


# Captioning: the clips of jobs captioning at the same time go through the captioner in one beam search.

CLIPS = [Audio(music(seconds, 16000, seed=seed), 16000) for seconds, seed in ((12.0, 1), (5.0, 2), (21.0, 3))]


@pytest.fixture(scope="module")
def captioner():
    from mtm_bot.stages.captioner import Captioner

    return Captioner.load("tiny", torch.device("cpu"), max_batch=4)


def held_first_batch(captioner):
    """Hold the captioner's next batch until the test releases it: (it started, release, restore)."""
    release, run = threading.Event(), captioner.batches.run
    first = threading.Event()

    def holding(items, cancels):
        if not first.is_set():
            first.set()
            release.wait(30)
        return run(items, cancels)

    captioner.batches.run = holding
    return first, release, lambda: setattr(captioner.batches, "run", run)


def test_clips_captioned_together_get_the_captions_they_get_alone(captioner):
    alone = [captioner.caption(clip) for clip in CLIPS]
    first, release, restore = held_first_batch(captioner)
    sizes = len(captioner.batches.batch_sizes)
    results = [None] * (len(CLIPS) + 1)

    def caption(i, clip):
        results[i] = captioner.caption(clip)

    threads = [threading.Thread(target=caption, args=(0, CLIPS[0]))]
    threads[0].start()
    assert first.wait(30)
    threads += [threading.Thread(target=caption, args=(i + 1, clip)) for i, clip in enumerate(CLIPS)]
    for thread in threads[1:]:
        thread.start()
    while len(captioner.batches._waiting) < len(CLIPS):
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(60)
    restore()
    assert captioner.batches.batch_sizes[sizes:] == [1, 3]  # the three that waited: one batch of 10 segments
    assert results == [alone[0], *alone]


def test_a_cancelled_caption_leaves_at_once_and_the_rest_of_its_batch_goes_on(captioner):
    alone = captioner.caption(CLIPS[1])
    first, release, restore = held_first_batch(captioner)
    token, outcomes = CancelToken(), {}

    def caption(name, clip, cancel=None):
        try:
            outcomes[name] = captioner.caption(clip, cancel)
        except Cancelled:
            outcomes[name] = "cancelled"

    running = threading.Thread(target=caption, args=("running", CLIPS[0]))
    running.start()
    assert first.wait(30)
    waiting = [
        threading.Thread(target=caption, args=("cancelled", CLIPS[2], token)),
        threading.Thread(target=caption, args=("kept", CLIPS[1])),
    ]
    for thread in waiting:
        thread.start()
    while len(captioner.batches._waiting) < 2:
        time.sleep(0.01)
    token.cancel()
    waiting[0].join(5)
    assert outcomes == {"cancelled": "cancelled"}  # while the batch ahead of it still runs
    release.set()
    for thread in (running, waiting[1]):
        thread.join(60)
    restore()
    assert outcomes["kept"] == alone


def test_a_batch_that_fails_runs_again_one_call_at_a_time():
    from mtm_bot.stages.batcher import CallBatcher

    def run(items, cancels):
        if 13 in items:
            raise ValueError("unlucky")
        return [item * 2 for item in items]

    batcher = CallBatcher(run, max_batch=4)
    batcher._busy = True  # as if a batch were running: the calls queue up behind it
    results = {}

    def call(item):
        try:
            results[item] = batcher(item)
        except ValueError as error:
            results[item] = str(error)

    threads = [threading.Thread(target=call, args=(item,)) for item in (1, 13, 2)]
    for thread in threads:
        thread.start()
    while len(batcher._waiting) < 3:
        time.sleep(0.01)
    with batcher._changed:
        batcher._busy = False
        batcher._changed.notify_all()
    for thread in threads:
        thread.join(10)
    assert results == {1: 2, 13: "unlucky", 2: 4}
    assert batcher.batch_sizes == [3, 1, 1, 1]


# Jobs arriving one after another, on a batcher of their own (no loop has run on it before).

LONG = "an ambient drone with choir, sleigh bells and a slow brass chorale under falling snow, " * 4  # 181 tokens


def test_staggered_jobs_all_decode_together_and_a_long_description_joins():
    """Four jobs, each arriving while the others generate: the running loop takes every one of them (its
    bucket grows) instead of staying at the size it started with, and the last job's 181-token description
    joins it (the text buffers hold MAX_TEXT_TOKENS whatever the first loop's descriptions were)."""
    generator = Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), 10, max_batch=4)
    jobs = [
        dict(clip=None, blocks=blocks(2, caption), seed=i)
        for i, caption in enumerate(["a carol", "brass", "a choir", LONG])
    ]
    alone = [generator.generate(job["clip"], job["blocks"], seed=job["seed"]).codes for job in jobs]
    generator.batcher.batch_sizes.clear()
    decoding, step = [], generator.decoder.step

    def counting(*args):
        decoding.append(int(generator.decoder.batch.active.sum()))
        return step(*args)

    generator.decoder.step = counting
    results, threads = {}, []

    def run(i):
        def report(p):
            if (p.block, p.step) == (1, 5) and i + 1 < len(jobs):  # the next job arrives mid-block
                threads.append(threading.Thread(target=run, args=(i + 1,)))
                threads[-1].start()

        try:
            results[i] = generator.generate(
                jobs[i]["clip"], jobs[i]["blocks"], seed=jobs[i]["seed"], progress=report
            ).codes
        except Exception as error:
            results[i] = error

    run(0)
    while len(threads) < len(jobs) - 1:
        time.sleep(0.01)
    for thread in threads:
        thread.join(120)
    assert max(decoding) == 4  # all four jobs' blocks in one loop at once
    for mine, theirs in zip([results[i] for i in range(len(jobs))], alone):
        assert torch.equal(mine, theirs)


def test_a_job_cancelled_while_its_block_waits_for_a_slot_leaves_at_once(generator):
    """Its block waits behind a busy decode thread; cancelling the job ends its wait, not the next loop."""
    holding, hold = threading.Event(), threading.Event()
    holder = threading.Thread(target=generator.batcher.call, args=(lambda: (holding.set(), hold.wait(60)),))
    holder.start()
    holding.wait(60)
    token, outcome = CancelToken(), {}

    def run():
        try:
            generator.generate(None, blocks(2, "a carol"), seed=1, cancel=token)
        except Cancelled:
            outcome["when"] = time.monotonic()

    job = threading.Thread(target=run)
    job.start()
    while not generator.batcher._waiting:
        time.sleep(0.01)
    cancelled_at = time.monotonic()
    token.cancel()
    job.join(5)
    assert "when" in outcome and outcome["when"] - cancelled_at < 1.0  # while the decode thread is still busy
    assert not generator.batcher._waiting and holder.is_alive()
    hold.set()
    holder.join(60)


def test_a_generator_nobody_holds_is_freed_with_its_decode_thread():
    generator = Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), 10, max_batch=2)
    generator.generate(None, blocks(1, "a carol"), seed=1)
    model, thread = weakref.ref(generator.model), generator.batcher._thread
    del generator
    gc.collect()
    thread.join(5)
    assert model() is None and not thread.is_alive()


def test_a_block_cancelled_as_the_decode_thread_wakes_for_it_leaves_the_thread_serving(monkeypatch):
    """The decode thread sees a block waiting, lets go of the queue's lock, and the block's job is cancelled
    before the thread takes it: the thread finds the queue empty and serves the next job (it died before,
    and every later job of that worker waited for ever)."""
    from mtm_bot.stages.batcher import BlockBatcher

    generator = Generator.load("tiny", "facebook/musicgen-melody", torch.device("cpu"), 10, max_batch=2)
    woke, go_on = threading.Event(), threading.Event()
    serve_one = BlockBatcher._serve_one

    def slow_to_take(self):
        woke.set()
        go_on.wait(60)
        serve_one(self)

    monkeypatch.setattr(BlockBatcher, "_serve_one", slow_to_take)
    token = CancelToken()
    cancelled = threading.Thread(
        target=lambda: pytest.raises(Cancelled, generator.generate, None, blocks(1, "a carol"), seed=1, cancel=token)
    )
    cancelled.start()
    assert woke.wait(60)
    token.cancel()
    cancelled.join(5)
    assert not cancelled.is_alive() and not generator.batcher._waiting
    go_on.set()
    monkeypatch.setattr(BlockBatcher, "_serve_one", serve_one)
    result = {}
    later = threading.Thread(target=lambda: result.update(codes=generator.generate(None, blocks(1, "a carol"), seed=2)))
    later.start()
    later.join(60)
    assert "codes" in result, "the next job's block was decoded"
