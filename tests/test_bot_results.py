"""The controls under a result, end to end: the real bot (tiny pipeline) against the loopback emulator.

Every compose result carries Reroll, Extend, Remix, MIDI, Play (tests/test_bot_voice.py), Edit captions and a
Redo select; each click but Play is an ordinary job of whoever clicked, built on the kept track. One bot
serves the module (restarted once, on the same storage and emulator); tests run in file order and each
waits until its jobs have settled.
"""

from __future__ import annotations

import io
import re

import mido
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from discord_emulator import DiscordEmulator, FakeUser, Interaction, Message
from synth import music
from test_bot_e2e import (
    JOB_SECONDS,
    LINE,
    accepted,
    connect_bot,
    disconnect_bot,
    ephemeral_error,
    every_job_settled,
    results_for,
    wav_bytes,
)

from mtm_bot.core.audio import Audio, write
from mtm_bot.jobs.job import JobState
from mtm_bot.stages.generator import CROSSFADE_SECONDS, EDGE_SECONDS, SAMPLE_RATE

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEAM_SAMPLES = round((EDGE_SECONDS + CROSSFADE_SECONDS) * SAMPLE_RATE)


class Calls:
    """Counts the calls of a model stage's methods, wrapping them in place."""

    def __init__(self, stage, *names: str) -> None:
        self.count = 0
        for name in names:
            setattr(stage, name, self._counted(getattr(stage, name)))

    def _counted(self, method):
        def call(*args, **kwargs):
            self.count += 1
            return method(*args, **kwargs)

        return call


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    emulator = await DiscordEmulator().start()
    storage = tmp_path_factory.mktemp("storage")
    # A fixed seed, as in every test: a Reroll still gets a new one (derived from it and its job id); jobs run
    # together, their blocks batched, as by default.
    state = {"bot": await connect_bot(emulator, storage, MTM_MAX_BATCH="4")}
    yield emulator, state, storage
    await disconnect_bot(*state["bot"])
    await emulator.stop()


def bot_of(world):
    return world[1]["bot"][0]


def track(message: Message) -> np.ndarray:
    (sent,) = [f for f in message.files if f.filename.endswith(".wav")]
    samples, rate = sf.read(io.BytesIO(sent.data), dtype="float32")
    assert rate == SAMPLE_RATE
    return samples


async def result_of(emulator: DiscordEmulator, interaction: Interaction, user: FakeUser) -> Message:
    """Wait for the job accepted by `interaction` and return its public result."""
    job_id = await accepted(emulator, interaction)
    return await emulator.wait_for(
        lambda: next((m for m in results_for(emulator, user) if f"(job `{job_id}`" in m.content), None),
        JOB_SECONDS,
        f"the result of job {job_id}",
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def original(world):
    """Alice's 20 s track: two blocks, so Redo can start from 0:10."""
    emulator, _, _ = world
    alice = emulator.user("alice")
    compose = await emulator.slash(
        alice,
        "compose",
        {"instruction": "a cosy jazz carol", "duration": 20},
        attachment=(wav_bytes(14.0), "hum.wav", "audio/wav"),
    )
    return await result_of(emulator, compose, alice)


def caption_lines(message: Message) -> list[str]:
    return [line for line in message.text().split("\n") if LINE.match(line)]


def job_id_of(message: Message) -> str:
    return re.search(r"\(job `([0-9a-f]{8})`", message.content).group(1)


async def test_every_result_carries_its_controls(world, original):
    rows = original.components
    labels = [c.get("label") for row in rows for c in row["components"] if c["type"] == 2]
    assert labels == ["Reroll", "Extend", "Remix", "MIDI", "Play", "Edit captions"]
    (select,) = [c for row in rows for c in row["components"] if c["type"] == 3]
    assert select["placeholder"] == "Redo from…"
    assert [o["value"] for o in select["options"]] == ["10"] and "0:10" in select["options"][0]["label"]
    assert all(job_id_of(original) in c["custom_id"] for row in rows for c in row["components"])


async def test_reroll_is_a_new_take_by_whoever_clicked_without_captioning_or_the_llm(world, original):
    emulator, _, _ = world
    bot, bob = bot_of(world), emulator.user("bob")
    captions, llm = Calls(bot.pipeline.captioner, "caption"), Calls(bot.pipeline.refiner, "refine", "write")
    result = await result_of(emulator, await emulator.click(bob, original, "Reroll"), bob)
    assert f"another take of job `{job_id_of(original)}`" in result.content
    assert caption_lines(result) == caption_lines(original) and len(caption_lines(result)) == 2
    assert not np.array_equal(track(result), track(original))
    assert (captions.count, llm.count) == (0, 0)
    assert result.components  # a derived track is a starting point too


async def test_extend_begins_with_the_original_track(world, original):
    emulator, _, _ = world
    carol = emulator.user("carol")
    opened = await emulator.click(carol, original, "Extend")
    modal = await emulator.wait_for(lambda: opened.modal, 10, "the Extend modal")
    assert "Seconds to add" in modal.inputs[0].label
    result = await result_of(emulator, await emulator.submit_modal(carol, opened, {}), carol)  # the default: 30 s
    assert f"extended from job `{job_id_of(original)}` by 30 s" in result.content
    longer, before = track(result), track(original)
    assert len(longer) == 50 * SAMPLE_RATE
    np.testing.assert_array_equal(longer[: len(before) - SEAM_SAMPLES], before[: len(before) - SEAM_SAMPLES])
    assert len(caption_lines(result)) == 5


async def test_extend_refuses_what_it_cannot_do(world, original):
    emulator, _, _ = world
    dave = emulator.user("dave")
    opened = await emulator.click(dave, original, "Extend")
    modal = await emulator.wait_for(lambda: opened.modal, 10, "the Extend modal")
    refused = await emulator.submit_modal(dave, opened, {modal.inputs[0].label: "abc"})
    assert "whole number of seconds from 10 to 60" in await ephemeral_error(emulator, refused)


async def test_remix_runs_the_llm_but_never_the_captioner(world, original):
    emulator, _, _ = world
    bot, erin = bot_of(world), emulator.user("erin")
    captions, llm = Calls(bot.pipeline.captioner, "caption"), Calls(bot.pipeline.refiner, "refine", "write")
    opened = await emulator.click(erin, original, "Remix")
    result = await result_of(
        emulator, await emulator.submit_modal(erin, opened, {"New instruction": "a heavy metal anthem"}), erin
    )
    assert f"remixed from job `{job_id_of(original)}`" in result.content and "heavy metal anthem" in result.content
    assert (captions.count, llm.count) == (0, 1)
    assert len(track(result)) == 20 * SAMPLE_RATE


async def test_redo_keeps_the_earlier_blocks_codes(world, original):
    emulator, _, storage = world
    frank = emulator.user("frank")
    result = await result_of(emulator, await emulator.choose(frank, original, "10"), frank)
    assert f"job `{job_id_of(original)}` redone from 0:10" in result.content
    with (
        np.load(storage / "outputs" / f"{job_id_of(original)}.kept.npz") as before,
        np.load(storage / "outputs" / f"{job_id_of(result)}.kept.npz") as after,
    ):
        assert np.array_equal(after["codes"][:, :500], before["codes"][:, :500])
        assert not np.array_equal(after["codes"][:, 500:], before["codes"][:, 500:])
    np.testing.assert_array_equal(
        track(result)[: 10 * SAMPLE_RATE - SEAM_SAMPLES], track(original)[: 10 * SAMPLE_RATE - SEAM_SAMPLES]
    )


async def test_midi_sends_the_notes_privately_to_whoever_clicked(world, original):
    emulator, _, storage = world
    grace = emulator.user("grace")
    # The tiny models make noise; give the kept track real notes so that there is something to transcribe.
    write(Audio(music(20.0, SAMPLE_RATE, seed=3), SAMPLE_RATE), storage / "outputs" / f"{job_id_of(original)}.wav")
    clicked = await emulator.click(grace, original, "MIDI")
    sent = await emulator.wait_for(
        lambda: next((m for m in clicked.visible_messages() if m.files), None), JOB_SECONDS, "the MIDI file"
    )
    assert sent.ephemeral and sent.files[0].filename == f"mtm-{job_id_of(original)}.mid"
    notes = [m for m in mido.MidiFile(file=io.BytesIO(sent.files[0].data)) if m.type == "note_on" and m.velocity > 0]
    assert notes and re.search(rf"{len(notes)} notes", sent.content)


async def test_edit_captions_makes_a_track_of_the_edited_lines_without_captioning_or_the_llm(world, original):
    emulator, _, _ = world
    bot, judy = bot_of(world), emulator.user("judy")
    captions, llm = Calls(bot.pipeline.captioner, "caption"), Calls(bot.pipeline.refiner, "refine", "write")
    opened = await emulator.click(judy, original, "Edit captions")
    modal = await emulator.wait_for(lambda: opened.modal, 10, "the Edit captions modal")
    assert modal.inputs[0].value.split("\n") == caption_lines(original)
    edited = ["0:00\u20130:10 a lone cello, slow and dark", "0:10\u20130:20 a marching band with snare rolls"]
    result = await result_of(
        emulator, await emulator.submit_modal(judy, opened, {modal.inputs[0].label: "\n".join(edited)}), judy
    )
    assert f"job `{job_id_of(original)}` with edited captions" in result.content
    assert caption_lines(result) == edited
    assert len(track(result)) == len(track(original)) and not np.array_equal(track(result), track(original))
    assert (captions.count, llm.count) == (0, 0)
    assert "Edit captions" in str(result.components)  # an edited track can be edited again


@pytest.mark.parametrize(
    "lines, fragment",
    [
        ("0:00\u20130:10 a lone cello", "write 2 lines"),
        ("0:00\u20130:10 a lone cello\n0:10\u20130:30 a band", "keep the time ranges as they are"),
        ("0:00\u20130:10 a lone cello\n0:10\u20130:20", "has no caption"),
        ("a lone cello\na band", "does not start with a time range"),
    ],
)
async def test_bad_edits_are_refused_without_queueing(world, original, lines, fragment):
    emulator, _, _ = world
    bot, ken = bot_of(world), emulator.user("ken")
    opened = await emulator.click(ken, original, "Edit captions")
    modal = await emulator.wait_for(lambda: opened.modal, 10, "the Edit captions modal")
    refused = await emulator.submit_modal(ken, opened, {modal.inputs[0].label: lines})
    assert fragment in await ephemeral_error(emulator, refused)
    assert await bot.store.recent_of(ken.id) == []


async def test_a_user_at_their_job_limit_is_refused_like_any_submission(world, original):
    emulator, _, _ = world
    bot, heidi = bot_of(world), emulator.user("heidi")
    limit, bot.queue.max_per_user = bot.queue.max_per_user, 1
    try:
        long = await emulator.slash(heidi, "compose", {"instruction": "an epic", "duration": 180})
        long_id = await accepted(emulator, long)
        refused = await emulator.click(heidi, original, "Reroll")
        assert "the limit is 1 per user" in await ephemeral_error(emulator, refused)
        opened = await emulator.click(heidi, original, "Edit captions")
        await emulator.wait_for(lambda: opened.modal, 10, "the Edit captions modal")
        refused = await emulator.submit_modal(heidi, opened, {})  # the lines as they were: a fresh take of them
        assert "the limit is 1 per user" in await ephemeral_error(emulator, refused)
    finally:
        bot.queue.max_per_user = limit
    await bot.scheduler.cancel(long_id, heidi.id)
    await every_job_settled(bot.store)


async def test_buttons_work_after_a_restart_and_an_expired_result_says_so(world, original):
    emulator, state, storage = world
    await every_job_settled(bot_of(world).store)
    await disconnect_bot(*state["bot"])
    state["bot"] = await connect_bot(emulator, storage, MTM_MAX_BATCH="4")
    ivan = emulator.user("ivan")
    result = await result_of(emulator, await emulator.click(ivan, original, "Reroll"), ivan)
    assert f"another take of job `{job_id_of(original)}`" in result.content

    bot = bot_of(world)
    job = await bot.store.get(job_id_of(original))
    assert job.state is JobState.DONE
    await bot.store.cleanup(before=job.finished_at + 1)  # its retention has ended
    refused = await emulator.click(ivan, original, "Reroll")
    text = await ephemeral_error(emulator, refused)
    assert "This result has expired" in text and "kept for 3 days" in text


async def test_two_takes_come_as_two_results_from_one_batched_decode_each_with_its_controls(world):
    """takes:2: the same refined captions, two seeds, their blocks in shared decode loops; each take is its
    own result (its own job id and controls), and Reroll on take 2 builds on take 2."""
    emulator, _, _ = world
    bot = bot_of(world)
    batcher = bot.pipeline.generator.batcher
    loops_before = len(batcher.batch_sizes)
    captions, llm = Calls(bot.pipeline.captioner, "caption"), Calls(bot.pipeline.refiner, "refine", "write")
    carol = emulator.user("carol")
    compose = await emulator.slash(
        carol,
        "compose",
        {"instruction": "a choir carol in a stone church", "duration": 20, "takes": 2},
        attachment=(wav_bytes(14.0), "hum.wav", "audio/wav"),
    )
    job_id = await accepted(emulator, compose)

    def takes():
        found = {
            m.content.split(" is ready")[0].rsplit("take ", 1)[-1]: m
            for m in results_for(emulator, carol)
            if " of 2 is ready" in m.content
        }
        return found if len(found) == 2 else None

    found = await emulator.wait_for(takes, JOB_SECONDS, "both takes")
    first, second = found["1 of 2"], found["2 of 2"]
    assert f"`{job_id}`" in first.content and f"`{job_id}`" not in second.content  # take 2: a job of its own
    assert caption_lines(first) == caption_lines(second) and len(caption_lines(first)) == 2
    assert track(first).shape == track(second).shape == (20 * SAMPLE_RATE,)
    assert not np.array_equal(track(first), track(second))
    assert (captions.count, llm.count) == (1, 1)  # captioned and refined once for both takes
    assert len(batcher.batch_sizes) - loops_before <= 2  # 4 blocks in at most 2 loops: the takes shared them
    labels = {c.get("label") for row in second.components for c in row["components"] if c["type"] == 2}
    assert {"Reroll", "Extend", "Remix", "MIDI", "Edit captions", "Play"} <= labels
    reroll = await result_of(emulator, await emulator.click(carol, second, "Reroll"), carol)
    assert job_id_of(second) in reroll.content and caption_lines(reroll) == caption_lines(second)
    stored = await bot.store.get(job_id)
    assert stored.result_json["takes"] == [job_id_of(second)]
