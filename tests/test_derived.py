"""Starting the next job from a kept track (tiny profile): Reroll, Remix, Extend, Redo, Edit captions, and what
is kept."""

import numpy as np
import pytest
import torch
from synth import music

from mtm_bot.core.audio import Audio, integrated_loudness, write
from mtm_bot.core.errors import InputError
from mtm_bot.core.settings import Settings
from mtm_bot.stages.generator import CROSSFADE_SECONDS, EDGE_SECONDS, SAMPLE_RATE
from mtm_bot.stages.kept import Kept, KeptFiles, ResultExpired
from mtm_bot.stages.pipeline import Pipeline, parse_edited_captions

SEAM_SAMPLES = round((EDGE_SECONDS + CROSSFADE_SECONDS) * SAMPLE_RATE)  # the crossfade ends this far before a seam


class Counting:
    """A model stage that counts its calls."""

    def __init__(self, stage, *methods: str) -> None:
        self.stage, self.calls = stage, 0
        for name in methods:
            setattr(self, name, self._counted(getattr(stage, name)))

    def _counted(self, method):
        def call(*args, **kwargs):
            self.calls += 1
            return method(*args, **kwargs)

        return call

    def __getattr__(self, name):
        return getattr(self.stage, name)


@pytest.fixture(scope="module")
def loaded():
    return Pipeline(Settings(profile="tiny", device="cpu", max_output_seconds=40)).load()


@pytest.fixture()
def pipeline(loaded):
    """The loaded models, with the captioner and the refiner counting their calls."""
    return Pipeline(
        loaded.settings,
        captioner=Counting(loaded.captioner, "caption"),
        refiner=Counting(loaded.refiner, "refine", "write"),
        generator=loaded.generator,
    )


@pytest.fixture(scope="module")
def clip():
    return Audio(music(14.0, rate=22050), 22050)


@pytest.fixture(scope="module")
def kept(loaded, clip, tmp_path_factory):
    """A 20 s track, saved and read back as the bot and the CLI keep it."""
    result = loaded.compose(clip, "a cosy jazz carol", duration=20, seed=3)
    folder = tmp_path_factory.mktemp("kept")
    write(clip, folder / "clip.wav")
    files = KeptFiles.in_folder(folder)
    result.kept("a cosy jazz carol", clip).save(files)
    return Kept.load(files, read_clip=loaded.read_clip)


def test_kept_state_reads_back_as_it_was_written(loaded, clip, tmp_path):
    result = loaded.compose(clip, "a cosy jazz carol", duration=20, seed=5)
    files = KeptFiles(tmp_path / "track.wav", tmp_path / "state.npz", None)
    result.kept("a cosy jazz carol", clip).save(files)
    back = Kept.load(files, read_clip=lambda path: clip)
    assert torch.equal(back.rendered.codes, result.codes)
    assert back.blocks == result.blocks and back.refinement == result.refinement and back.segments == result.segments
    assert (back.seed, back.gain, back.instruction) == (5, result.gain, "a cosy jazz carol")
    # The delivered 16-bit track: what a listener heard.
    np.testing.assert_allclose(back.rendered.audio.samples, result.audio.samples, atol=1 / 32768)
    files.state.unlink()
    with pytest.raises(ResultExpired):
        Kept.load(files, read_clip=lambda path: clip)


def test_reroll_is_another_take_without_captioning_or_the_llm(pipeline, kept):
    again = pipeline.reroll(kept, seed=99)
    assert (pipeline.captioner.calls, pipeline.refiner.calls) == (0, 0)
    assert again.caption_lines() == _lines(kept)
    assert again.audio.duration == kept.duration
    assert not torch.equal(again.codes, kept.rendered.codes)


def test_remix_refines_the_stored_captions_again_without_captioning(pipeline, kept):
    remixed = pipeline.remix(kept, "a heavy metal anthem", seed=4)
    assert (pipeline.captioner.calls, pipeline.refiner.calls) == (0, 1)
    assert remixed.segments == kept.segments
    assert [b.segment for b in remixed.blocks] == [b.segment for b in kept.blocks]
    assert remixed.audio.duration == kept.duration


def test_extend_begins_with_the_original_track_sample_for_sample(pipeline, kept):
    longer = pipeline.extend(kept, 10, seed=8)
    end = round(kept.duration * SAMPLE_RATE)
    assert len(longer.audio.samples) == end + 10 * SAMPLE_RATE
    np.testing.assert_array_equal(
        longer.audio.samples[: end - SEAM_SAMPLES], kept.rendered.audio.samples[: end - SEAM_SAMPLES]
    )
    assert torch.equal(longer.codes[..., :1000], kept.rendered.codes)
    # The new part at the level the original was delivered at: its samples are its codes' decode at that gain.
    decoded = pipeline.generator._decode(longer.codes)[end : len(longer.audio.samples)]
    new_part = Audio(longer.audio.samples[end:], SAMPLE_RATE)
    level = float(np.dot(new_part.samples, decoded) / np.dot(decoded, decoded))
    assert level == pytest.approx(kept.gain, rel=1e-4) and longer.gain == pytest.approx(kept.gain)
    assert abs(integrated_loudness(new_part) - integrated_loudness(kept.rendered.audio)) < 6
    # The captions and the melody keep cycling where the track left off: a 14 s clip has two segments.
    assert [b.segment for b in longer.blocks] == [0, 1, 0]
    assert longer.caption_lines()[2].startswith("0:20\u20130:30 ")
    assert (pipeline.captioner.calls, pipeline.refiner.calls) == (0, 0)


def test_edit_generates_from_the_users_captions_without_captioning_or_the_llm(pipeline, kept, tmp_path):
    edited = pipeline.edit(kept, ["a lone cello", "a marching band"], seed=5)
    assert (pipeline.captioner.calls, pipeline.refiner.calls) == (0, 0)
    assert edited.caption_lines() == ["0:00\u20130:10 a lone cello", "0:10\u20130:20 a marching band"]
    assert [b.description.split(".")[0] for b in edited.blocks] == ["a lone cello", "a marching band"]
    assert edited.refinement.style == kept.refinement.style  # the rest of the refinement stays
    assert edited.audio.duration == kept.duration and not torch.equal(edited.codes, kept.rendered.codes)
    with pytest.raises(InputError, match="one caption per block"):
        pipeline.edit(kept, ["only one"], seed=5)
    # What was edited is kept, and a Remix of it follows the clip's segments again.
    files = KeptFiles(tmp_path / "track.wav", tmp_path / "state.npz", None)
    edited.kept(kept.instruction, None).save(files)
    again = Kept.load(files, read_clip=pipeline.read_clip)
    assert [b.segment for b in again.blocks] == [0, 1] and again.refinement.segments[1].caption == "a marching band"
    again.clip, again.segments = kept.clip, kept.segments
    remixed = pipeline.remix(again, "a heavy metal anthem", seed=4)
    assert [b.segment for b in remixed.blocks] == [b.segment for b in kept.blocks]


RANGES = [(0.0, 10.0), (10.0, 20.0)]


def test_edited_caption_lines_parse_with_either_dash_and_blank_lines_between():
    text = "0:00\u20130:10  a lone cello \n\n0:10-0:20 a marching band\n"
    assert parse_edited_captions(text, RANGES) == ["a lone cello", "a marching band"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a lone cello\n0:10\u20130:20 a band", "Line 1 ('a lone cello') does not start with a time range"),
        ("0:00\u20130:10 a lone cello", "write 2 lines, one per block; you wrote 1"),
        ("0:00\u20130:10 a\n0:10\u20130:20 b\n0:20\u20130:30 c", "you wrote 3"),
        (
            "0:00\u20130:10 a\n0:10\u20130:25 b",
            "Line 2 says 0:10\u20130:25, but block 2 of this track is 0:10\u20130:20",
        ),
        ("0:00\u20130:10 a\n0:10\u20130:20   ", "Line 2 (0:10\u20130:20) has no caption"),
    ],
)
def test_bad_edited_caption_lines_say_what_to_fix(text, fragment):
    with pytest.raises(InputError) as refused:
        parse_edited_captions(text, RANGES)
    assert fragment in str(refused.value)


def test_extend_past_the_output_limit_is_refused(pipeline, kept):
    with pytest.raises(InputError, match="40 s limit"):
        pipeline.extend(kept, 30, seed=1)
    with pytest.raises(InputError, match="10 to 60 seconds"):
        pipeline.extend(kept, 5, seed=1)


def test_redo_keeps_everything_before_the_chosen_block(pipeline, kept):
    redone = pipeline.redo(kept, 10, seed=21)
    assert torch.equal(redone.codes[..., :500], kept.rendered.codes[..., :500])
    assert not torch.equal(redone.codes[..., 500:], kept.rendered.codes[..., 500:])
    cut = 10 * SAMPLE_RATE - SEAM_SAMPLES
    np.testing.assert_array_equal(redone.audio.samples[:cut], kept.rendered.audio.samples[:cut])
    assert redone.audio.duration == kept.duration and redone.caption_lines() == _lines(kept)
    with pytest.raises(InputError, match="0:10"):
        pipeline.redo(kept, 5, seed=1)


def _lines(kept: Kept) -> list[str]:
    from mtm_bot.stages.pipeline import caption_lines

    return caption_lines(kept.blocks, kept.refinement)


# Stereo checkpoints, and a server that switches between mono and stereo.


@pytest.fixture(scope="module")
def stereo():
    return Pipeline(
        Settings(profile="tiny", device="cpu", max_output_seconds=40, musicgen_id="facebook/musicgen-stereo-melody")
    ).load()


@pytest.fixture(scope="module")
def stereo_kept(stereo, clip, tmp_path_factory):
    result = stereo.compose(clip, "a cosy jazz carol", duration=20, seed=3)
    folder = tmp_path_factory.mktemp("stereo")
    write(clip, folder / "clip.wav")
    files = KeptFiles.in_folder(folder)
    result.kept("a cosy jazz carol", clip).save(files)
    return Kept.load(files, read_clip=stereo.read_clip)


def test_a_stereo_track_keeps_two_distinct_channels_and_its_eight_codebooks(stereo_kept):
    samples = stereo_kept.rendered.audio.samples
    assert samples.shape == (20 * SAMPLE_RATE, 2) and stereo_kept.rendered.codes.shape == (1, 8, 1000)
    assert not np.allclose(samples[:, 0], samples[:, 1])


@pytest.mark.parametrize("how", ["extend", "redo"])
def test_extend_and_redo_keep_a_stereo_track_sample_for_sample_on_both_channels(stereo, stereo_kept, how):
    result = stereo.extend(stereo_kept, 10, seed=8) if how == "extend" else stereo.redo(stereo_kept, 10, seed=21)
    seam = (20 if how == "extend" else 10) * SAMPLE_RATE - SEAM_SAMPLES
    assert result.audio.samples.shape == ((30 if how == "extend" else 20) * SAMPLE_RATE, 2)
    np.testing.assert_array_equal(result.audio.samples[:seam], stereo_kept.rendered.audio.samples[:seam])
    frames = seam // 640
    assert torch.equal(result.codes[..., :frames], stereo_kept.rendered.codes[..., :frames])


def test_a_mono_track_on_a_server_now_stereo_rerolls_in_stereo_and_refuses_extend_and_redo(stereo, kept):
    again = stereo.reroll(kept, seed=99)
    assert again.audio.samples.shape == (len(kept.rendered.audio.samples), 2)
    assert again.caption_lines() == _lines(kept)
    for attempt in (lambda: stereo.extend(kept, 10, seed=1), lambda: stereo.redo(kept, 10, seed=1)):
        with pytest.raises(InputError, match="made in mono, and this server now makes stereo tracks"):
            attempt()


def test_a_stereo_track_on_a_server_now_mono_refuses_extend_clearly(loaded, stereo_kept):
    with pytest.raises(InputError, match="made in stereo, and this server now makes mono tracks"):
        loaded.extend(stereo_kept, 10, seed=1)
