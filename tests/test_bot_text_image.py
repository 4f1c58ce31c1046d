"""/compose from words alone and from a picture, end to end: the real bot against the loopback emulator.

One bot and one tiny pipeline serve the module; tests run in file order and each waits for its jobs.
"""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import pytest_asyncio
import soundfile as sf
from test_bot_e2e import (
    JOB_SECONDS,
    LINE,
    accepted,
    ephemeral_error,
    every_job_settled,
    pings,
    results_for,
    running_bot,
)

from tests.pictures import bad_pictures, picture_bytes

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory):
    async with running_bot(tmp_path_factory.mktemp("storage")) as world:
        yield world


async def test_compose_takes_an_optional_clip_and_an_optional_picture(world):
    emulator, _ = world
    (compose,) = [c for c in emulator.commands[str(emulator.guild_id)] if c["name"] == "compose"]
    options = {o["name"]: o for o in compose["options"]}
    assert [o["name"] for o in compose["options"]] == ["instruction", "audio", "image", "duration", "takes"]
    assert (options["takes"]["min_value"], options["takes"]["max_value"]) == (1, 4)  # Discord enforces the range
    assert options["instruction"]["required"]
    assert all(options[name]["type"] == 11 and not options[name].get("required") for name in ("audio", "image"))


async def test_words_alone_deliver_a_track_of_the_requested_length_with_one_caption_per_block(world):
    emulator, bot = world
    wren = emulator.user("wren")
    interaction = await emulator.slash(wren, "compose", {"instruction": "a slow waltz for strings", "duration": 20})
    job_id = await accepted(emulator, interaction)
    (result,) = await emulator.wait_for(lambda: results_for(emulator, wren), JOB_SECONDS, "the track from words")
    assert f"`{job_id}`" in result.content and "words alone" in result.content
    assert pings(result) == (set(), {str(wren.id)})
    assert [line.split(" ")[0] for line in LINE.findall(result.text())] == ["0:00\u20130:10", "0:10\u20130:20"]
    (track,) = result.files
    audio, rate = sf.read(io.BytesIO(track.data))
    assert abs(len(audio) / rate - 20.0) < 0.05
    assert list(bot.store.inputs_dir.glob(f"{job_id}*")) == []  # nothing was uploaded, nothing stored


async def test_bad_pictures_get_ephemeral_errors_and_the_bot_keeps_serving(world, tmp_path):
    emulator, bot = world
    yuri = emulator.user("yuri")
    for name, (path, _, fragment) in bad_pictures(tmp_path).items():
        interaction = await emulator.slash(
            yuri, "compose", {"instruction": "lofi"}, attachments={"image": (path.read_bytes(), path.name, "image/png")}
        )
        text = await ephemeral_error(emulator, interaction)
        assert fragment in text, (name, text)

    # Refused from metadata alone: nothing is downloaded.
    downloads = len(emulator.cdn_downloads)
    too_big = await emulator.slash(
        yuri,
        "compose",
        {"instruction": "lofi"},
        attachments={"image": (picture_bytes(), "huge.png", "image/png", 200 * 1024 * 1024)},
    )
    assert "limit is 25 MB" in await ephemeral_error(emulator, too_big)
    song = await emulator.slash(
        yuri, "compose", {"instruction": "lofi"}, attachments={"image": (b"RIFF", "song.wav", "audio/wav")}
    )
    assert "not a picture" in await ephemeral_error(emulator, song)
    assert len(emulator.cdn_downloads) == downloads
    await every_job_settled(bot.store)
    assert await bot.store.recent_of(yuri.id) == [] and list(bot.store.inputs_dir.iterdir()) == []


async def test_a_picture_is_described_and_its_description_reaches_the_llm(world, monkeypatch):
    emulator, bot = world
    zoe = emulator.user("zoe")
    refiner = bot.pipeline.refiner
    pictures_given: list[str | None] = []
    prompts: list[str] = []

    def write(ranges, instruction, **kwargs):  # the refiner, keeping what it was given
        pictures_given.append(kwargs.get("picture"))
        prompts.append(refiner.prompt_from_words(ranges, instruction, kwargs.get("picture")))
        return type(refiner).write(refiner, ranges, instruction, **kwargs)

    monkeypatch.setattr(refiner, "write", write)
    picture = picture_bytes("JPEG", seed=7)
    interaction = await emulator.slash(
        zoe,
        "compose",
        {"instruction": "festive", "duration": 10},
        attachments={"image": (picture, "village.jpg", "image/jpeg")},
    )
    job_id = await accepted(emulator, interaction)
    stored = bot.store.inputs_dir / f"{job_id}.image.jpg"  # named by the job, never by the user's filename
    assert stored.read_bytes() == picture

    (result,) = await emulator.wait_for(lambda: results_for(emulator, zoe), JOB_SECONDS, "the track from a picture")
    description = await asyncio.to_thread(bot.pipeline.describe_image, stored)
    assert pictures_given == [description]
    (prompt,) = prompts
    user = prompt.split("<|start_header_id|>user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    assert json.loads(user)["picture"] == description
    assert "picture" in result.content and len(LINE.findall(result.text())) == 1
    (track,) = result.files
    audio, rate = sf.read(io.BytesIO(track.data))
    assert abs(len(audio) / rate - 10.0) < 0.05
    job = await bot.store.get(job_id)
    assert job.image_path == stored and job.input_path is None and job.result_json["picture"] == description
