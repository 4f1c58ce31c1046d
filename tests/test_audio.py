"""Audio I/O: what a user uploads is read faithfully or refused with the right message; what we send fits."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import soundfile as sf
from synth import bad_files, music, wav_claiming, write_music

from mtm_bot.core import audio
from mtm_bot.core.audio import (
    Audio,
    encode,
    encode_to_fit,
    integrated_loudness,
    load_clip,
    loudness_normalize,
    mp3_bitrates,
    probe,
    resample,
    true_peak_dbfs,
    write,
)
from mtm_bot.core.errors import ClipTooLong, ClipTooShort, FileTooLarge, InputError, OutputTooLarge


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(data), dtype="float32")


# ------------------------------------------------------------------------------------------- reading

LOSSLESS = [  # suffix, subtype, rate, channels, tolerance of one sample against the source
    (".wav", "PCM_U8", 8000, 1, 1 / 64),
    (".wav", "PCM_16", 22050, 2, 1e-4),
    (".wav", "PCM_24", 44100, 1, 1e-6),
    (".wav", "PCM_32", 48000, 2, 1e-7),
    (".wav", "FLOAT", 16000, 6, 0.0),
    (".wav", "DOUBLE", 32000, 1, 1e-7),
    (".flac", "PCM_16", 44100, 2, 1e-4),
    (".flac", "PCM_24", 96000, 1, 1e-6),
]


@pytest.mark.parametrize("suffix,subtype,rate,channels,tolerance", LOSSLESS)
def test_lossless_files_read_back_exactly_as_mono(tmp_path, suffix, subtype, rate, channels, tolerance):
    path = write_music(tmp_path / f"clip{suffix}", 1.5, rate=rate, channels=channels, subtype=subtype)
    clip = load_clip(path)
    source = music(1.5, rate, channels)
    expected = source if channels == 1 else source.mean(axis=1)
    assert clip.sample_rate == rate
    assert clip.samples.dtype == np.float32 and clip.samples.shape == (int(1.5 * rate),)
    assert clip.duration == pytest.approx(1.5)
    np.testing.assert_allclose(clip.samples, expected, atol=tolerance + 1e-7)
    info = probe(path)
    assert (info.channels, info.sample_rate, info.frames, info.subtype) == (channels, rate, int(1.5 * rate), subtype)


@pytest.mark.parametrize(
    "suffix,subtype,rate,channels",
    [
        (".ogg", "VORBIS", 44100, 2),
        (".ogg", "VORBIS", 32000, 1),
        (".ogg", "OPUS", 48000, 1),  # Discord voice messages
        (".mp3", "MPEG_LAYER_III", 44100, 2),
        (".mp3", "MPEG_LAYER_III", 16000, 1),
    ],
)
def test_lossy_files_read_back_with_exact_length_and_close_waveform(tmp_path, suffix, subtype, rate, channels):
    path = write_music(tmp_path / f"clip{suffix}", 2.0, rate=rate, channels=channels, subtype=subtype)
    clip = load_clip(path)
    source = music(2.0, rate, channels)
    expected = source if channels == 1 else source.mean(axis=1)
    assert probe(path).format == suffix[1:].upper()
    assert clip.sample_rate == rate
    assert len(clip.samples) == len(expected)  # no encoder delay or padding left in
    assert np.corrcoef(clip.samples, expected)[0, 1] > 0.98


def test_audio_is_float32_mono_or_stereo_in_soundfiles_layout():
    assert Audio(np.zeros(10, np.float64), 8000).samples.dtype == np.float32
    stereo = Audio(np.stack([np.ones(10), -np.ones(10)], axis=1), 8000)
    assert (stereo.channels, stereo.duration) == (2, 10 / 8000)
    np.testing.assert_array_equal(stereo.mono().samples, np.zeros(10))
    for shape in ((2, 10), (10, 3), (10, 2, 1)):  # channels first, surround, nonsense
        with pytest.raises(ValueError):
            Audio(np.zeros(shape, np.float32), 8000)


# ------------------------------------------------------------------------------------------ refusing

EXPECTED_NUMBERS = {  # numbers the user must see in the message
    "truncated WAV": ["3.0", "1.5"],
    "truncated FLAC": ["3.0"],
    "truncated MP3": ["3.0"],
    "WAV header claiming 10 h": ["36000", "60 s"],
    "0.5 s clip": ["0.50", "1 s"],
    "75 s clip": ["75.0", "60 s"],
    "empty file": ["0 bytes"],
    "zero-frame WAV": ["0 samples"],
    "digital silence": ["-80 dBFS"],
}


def test_every_bad_file_gets_its_typed_error_with_a_specific_message(tmp_path):
    cases = bad_files(tmp_path)
    assert len(cases) >= 12
    for name, (path, error) in cases.items():
        with pytest.raises(InputError) as caught:
            load_clip(path)
        assert type(caught.value) is error, name
        message = str(caught.value)
        assert message.endswith(".") and message.count(". ") == 0, (name, message)  # one sentence
        for number in EXPECTED_NUMBERS.get(name, []):
            assert number in message, (name, message)


def test_ten_hour_header_is_refused_without_decoding(tmp_path, monkeypatch):
    path = wav_claiming(tmp_path / "ten_hours.wav", 10 * 3600)
    assert path.stat().st_size < 2000  # the claim is all header: the data is not there to read
    assert probe(path).duration == pytest.approx(36000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("sample data was decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(ClipTooLong, match=r"36000\.0 s long; the limit is 60 s"):
        load_clip(path)


def test_a_voice_messages_opus_length_is_checked_before_decoding(tmp_path, monkeypatch):
    """Discord's voice messages are OGG/Opus at 48 kHz; libsndfile reads Opus, and its length from the last page."""
    assert "OPUS" in sf.available_subtypes("OGG")
    path = write_music(tmp_path / "voice-message.ogg", 3.3, rate=48000, subtype="OPUS")
    assert load_clip(path, max_seconds=4).duration == pytest.approx(3.3)
    monkeypatch.setattr(sf.SoundFile, "read", lambda *args, **kwargs: pytest.fail("sample data was decoded"))
    with pytest.raises(ClipTooLong, match=r"3\.3 s long; the limit is 3 s"):
        load_clip(path, max_seconds=3)
    with pytest.raises(ClipTooShort, match=r"3\.30 s long; it must be at least 4 s"):
        load_clip(path, min_seconds=4)


def test_limits_come_from_the_caller(tmp_path):
    path = write_music(tmp_path / "clip.wav", 3.0, rate=16000)  # 96 kB
    assert load_clip(path, min_seconds=2, max_seconds=4, max_bytes=200_000).duration == pytest.approx(3.0)
    with pytest.raises(ClipTooShort, match=r"3\.00 s long; it must be at least 5 s"):
        load_clip(path, min_seconds=5)
    with pytest.raises(ClipTooLong, match=r"3\.0 s long; the limit is 2\.5 s"):
        load_clip(path, max_seconds=2.5)
    with pytest.raises(FileTooLarge, match=r"0\.09 MB; the upload limit is 0\.05 MB"):
        load_clip(path, max_bytes=int(0.05 * 1024 * 1024))


def test_a_wav_cut_after_its_header_is_truncated_not_short(tmp_path):
    # 5 s claimed, 0.5 s present: the user should hear "cut short", not "too short".
    path = wav_claiming(tmp_path / "cut.wav", 5.0, actual_seconds=0.5)
    with pytest.raises(audio.TruncatedAudio, match=r"promises 5\.0 s but only 0\.5 s"):
        load_clip(path)


def test_a_streamed_wav_without_a_length_reads_fully(tmp_path):
    path = wav_claiming(tmp_path / "streamed.wav", 1.5, actual_seconds=1.5)
    data = bytearray(path.read_bytes())
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # what a writer to a pipe leaves in the header
    path.write_bytes(data)
    assert load_clip(path).duration == pytest.approx(1.5)


# ------------------------------------------------------------------------------ resampling, loudness


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("source_rate,target_rate", [(44100, 16000), (16000, 32000), (48000, 32000)])
def test_resampling_keeps_a_sine_at_its_frequency(source_rate, target_rate):
    t = np.arange(source_rate) / source_rate
    sine = Audio(0.5 * np.sin(2 * np.pi * 1000 * t), source_rate)
    out = resample(sine, target_rate)
    assert out.sample_rate == target_rate
    assert len(out.samples) == target_rate
    assert _peak_hz(out.samples, target_rate) == pytest.approx(1000, abs=1.0)
    middle = out.samples[target_rate // 4 : -target_rate // 4]
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)


def test_resampling_to_the_same_rate_is_the_identity():
    clip = Audio(music(0.5, 16000), 16000)
    assert resample(clip, 16000) is clip


def test_true_peak_sees_peaks_between_samples():
    # A quarter-rate sine sampled at 45 degrees: every sample is 0.707, the waveform reaches 1.0.
    n = np.arange(8000)
    clip = Audio(np.sin(np.pi / 2 * n + np.pi / 4), 8000)
    assert 20 * np.log10(np.abs(clip.samples).max()) == pytest.approx(-3.0, abs=0.1)
    assert true_peak_dbfs(clip) == pytest.approx(0.0, abs=0.2)


def test_loud_music_is_brought_to_the_target_loudness_below_the_peak_limit():
    loud = Audio(np.tanh(6 * music(6.0)), 32000)  # heavily saturated: about -7 LUFS
    assert integrated_loudness(loud) > -9
    out = loudness_normalize(loud, target_lufs=-14.0, peak_dbfs=-1.0)
    assert integrated_loudness(out) == pytest.approx(-14.0, abs=0.5)
    assert true_peak_dbfs(out) < -1.0 + 0.05


def test_quiet_peaky_music_is_raised_until_the_true_peak_limit():
    quiet = Audio(0.02 * music(6.0), 32000)
    out = loudness_normalize(quiet, target_lufs=-14.0, peak_dbfs=-1.0)
    assert true_peak_dbfs(out) == pytest.approx(-1.0, abs=0.05)
    assert integrated_loudness(quiet) + 10 < integrated_loudness(out) <= -14.0 + 0.5


@pytest.mark.parametrize("samples", [np.zeros(32000), np.full(3000, 0.5)], ids=["silence", "shorter than 400 ms"])
def test_loudness_of_silence_or_a_blip_is_left_alone(samples):
    clip = Audio(samples, 32000)
    out = loudness_normalize(clip)
    assert np.isfinite(out.samples).all()
    np.testing.assert_array_equal(out.samples, clip.samples)


# ---------------------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def track() -> Audio:
    return Audio(music(8.0), 32000)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_encode_round_trip_keeps_length(track, fmt):
    samples, rate = _decode(encode(track, fmt))
    assert rate == 32000 and len(samples) == len(track.samples)
    if fmt in ("wav", "flac"):
        np.testing.assert_allclose(samples, track.samples, atol=1 / 32768 + 1e-7)
    else:
        assert np.corrcoef(samples, track.samples)[0, 1] > 0.99


def test_long_ogg_encodes_without_crashing_libvorbis():
    # Written in one call, 100 s of Vorbis overflows libvorbis' stack and kills the process.
    t = np.arange(100 * 32000) / 32000
    clip = Audio(0.3 * np.sin(2 * np.pi * 440 * t), 32000)
    samples, rate = _decode(encode(clip, "ogg", quality=0.1))
    assert len(samples) == len(clip.samples)


def test_mp3_bitrate_and_ogg_quality_set_the_size(track):
    for kbps in (64, 128, 192):
        size = len(encode(track, "mp3", bitrate_kbps=kbps))
        assert size == pytest.approx(kbps * 125 * track.duration, rel=0.05)
    assert len(encode(track, "ogg", quality=0.2)) < 0.6 * len(encode(track, "ogg", quality=1.0))


def test_mp3_at_a_rate_mp3_lacks_is_resampled():
    clip = Audio(music(1.0, 37000), 37000)
    samples, rate = _decode(encode(clip, "mp3"))
    assert rate == 44100 and len(samples) == 44100


def test_encode_clips_instead_of_wrapping_overloud_samples():
    clip = Audio(np.full(800, 1.5), 8000)
    samples, _ = _decode(encode(clip, "wav"))
    assert samples.min() > 0.99


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_write_picks_the_format_from_the_suffix(tmp_path, track, suffix):
    path = tmp_path / f"out{suffix}"
    write(track, path)
    assert probe(path).format == suffix[1:].upper()
    assert load_clip(path).duration == pytest.approx(track.duration)


def test_encode_to_fit_sends_wav_when_it_fits_and_predicts_its_size(track, monkeypatch):
    calls = []
    monkeypatch.setattr(audio, "encode", lambda *a, **k: calls.append(a[1]) or encode(*a, **k))
    wav_bytes = 44 + 2 * len(track.samples)
    result = encode_to_fit(track, wav_bytes)
    assert (result.format, result.extension, result.mime_type) == ("WAV", ".wav", "audio/wav")
    assert len(result.data) == wav_bytes
    assert calls == ["wav"]


@pytest.mark.parametrize("fraction,expected", [(0.9, "FLAC"), (0.3, "OGG"), (0.1, "MP3")])
def test_encode_to_fit_steps_down_to_a_compressed_format_within_budget(track, fraction, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(audio, "encode", lambda *a, **k: calls.append(a[1]) or encode(*a, **k))
    budget = int(fraction * (44 + 2 * len(track.samples)))
    result = encode_to_fit(track, budget)
    assert result.format == expected
    assert len(result.data) <= budget
    assert len(calls) <= 4
    samples, rate = _decode(result.data)
    assert len(samples) / rate == pytest.approx(track.duration, abs=1e-3)


@pytest.mark.parametrize("fraction,expected", [(1.0, "WAV"), (0.9, "FLAC"), (0.3, "OGG"), (0.1, "MP3"), (0.06, "MP3")])
def test_a_stereo_track_keeps_both_channels_in_every_format_that_fits(fraction, expected):
    stereo = Audio(music(8.0, 32000, channels=2), 32000)
    budget = int(fraction * (44 + 2 * stereo.samples.size))
    result = encode_to_fit(stereo, budget)
    assert result.format == expected and len(result.data) <= budget
    samples, rate = _decode(result.data)
    assert samples.shape == (len(stereo.samples), 2)  # no encoder delay or padding: the LAME tag fits
    left, right = (np.corrcoef(samples[:, c], stereo.samples[:, c])[0, 1] for c in (0, 1))
    assert min(left, right) > 0.9 and np.corrcoef(samples[:, 0], samples[:, 1])[0, 1] < 0.99  # two channels


def test_stereo_mp3_offers_only_bitrates_whose_frames_carry_the_lame_tag():
    assert 40 in mp3_bitrates(32000) and 40 not in mp3_bitrates(32000, channels=2)  # 180-byte frames
    stereo = Audio(music(4.0, 32000, channels=2), 32000)
    for kbps in mp3_bitrates(32000, channels=2)[-2:]:
        samples, rate = _decode(encode(stereo, "mp3", bitrate_kbps=kbps))
        assert len(samples) == len(stereo.samples), kbps


def test_encode_to_fit_takes_the_highest_mp3_bitrate_that_fits(track):
    budget = int(100 * 125 * track.duration + 4000)  # room for 96 kbps, not for 112
    result = encode_to_fit(track, budget)
    assert result.format == "MP3" and result.mime_type == "audio/mpeg"
    assert len(result.data) == pytest.approx(96 * 125 * track.duration, rel=0.03)
    assert 96 in mp3_bitrates(32000) and 112 in mp3_bitrates(32000)


def test_encode_to_fit_refuses_an_impossible_budget(track):
    with pytest.raises(OutputTooLarge) as caught:
        encode_to_fit(track, 10_000)
    message = str(caught.value)
    assert "8 s track" in message and "0.01 MB" in message and re.search(r"\b40 kbps MP3", message)


# ------------------------------------------------------------------------- the shared test signal


def test_synth_music_is_deterministic_and_plays_its_chord_progression():
    import synth

    rate = 16000
    clip = music(8.0, rate)
    assert clip.shape == (8 * rate,) and clip.dtype == np.float32
    assert np.abs(clip).max() == pytest.approx(0.5)
    np.testing.assert_array_equal(clip, music(8.0, rate))
    assert not np.array_equal(clip, music(8.0, rate, seed=1))
    assert music(1.0, rate, channels=2).shape == (rate, 2)
    bar = int(synth.BAR_SECONDS * rate)
    for i, chord in enumerate(synth.PROGRESSION):
        segment = clip[i * bar : (i + 1) * bar]
        power = np.abs(np.fft.rfft(segment * np.hanning(bar))) ** 2
        hz = np.fft.rfftfreq(bar, 1 / rate)
        band = (hz > 60) & (hz < 2000)
        pitch_class = np.round(12 * np.log2(hz[band] / 440) + 69).astype(int) % 12
        strongest = np.argsort(np.bincount(pitch_class, weights=power[band], minlength=12))[-3:]
        assert set(strongest) == {note % 12 for note in chord}, i
