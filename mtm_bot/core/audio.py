"""Audio I/O: validate and decode uploads, resample, loudness-normalise, encode to fit an upload limit.

Decoding and encoding go through libsndfile (soundfile), resampling through soxr, loudness through
pyloudnorm (ITU-R BS.1770 / EBU R128). Every problem a user can cause with an upload is a typed
`AudioError` whose message names the number that was out of bounds.

Decisions worth knowing:
- A clip is checked against its *header* before any sample is decoded, so a file that claims ten
  hours is refused at the cost of reading a few bytes. libsndfile shortens a WAV's data chunk to what
  is on disk, so for RIFF/WAVE we read the claimed length from the header ourselves.
- A clip whose decoded length falls short of what its header promises is `TruncatedAudio`. Ogg has
  no length in its header, so a cut Ogg file reads as a shorter clip (there is nothing to compare).
- Digital silence (every sample below -80 dBFS) and NaN/inf samples are refused: there is no music
  to caption, and the models would waste a GPU slot on it.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr

from .errors import ClipTooLong, ClipTooShort, EmptyAudio, FileTooLarge, NotAudio, OutputTooLarge, TruncatedAudio
from .settings import MIB

SILENCE_DBFS = -80.0
TARGET_LUFS = -14.0  # delivered tracks' integrated loudness (what streaming services normalise to)
PEAK_DBFS = -1.0  # their true-peak ceiling: room for a lossy encoder's overshoot
# A decode may come up this much short of the header's length (MP3 files without a Xing/LAME tag
# only estimate their length) before we call the file truncated.
LENGTH_TOLERANCE_SECONDS = 0.1
LENGTH_TOLERANCE_FRACTION = 0.02
READ_BLOCK_SAMPLES = 1 << 20  # per block over all channels, so a 100-channel file cannot blow up memory
WRITE_BLOCK_FRAMES = 1 << 15


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32: mono (n,), or stereo (n, 2) as soundfile, soxr and pyloudnorm take it
    sample_rate: int

    def __post_init__(self) -> None:
        samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        if not (samples.ndim == 1 or (samples.ndim == 2 and samples.shape[1] == 2)):
            raise ValueError(f"Audio samples must have shape (n,) or (n, 2), not {samples.shape}.")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {self.sample_rate}.")
        object.__setattr__(self, "samples", samples)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def channels(self) -> int:
        return 1 if self.samples.ndim == 1 else self.samples.shape[1]

    def mono(self) -> Audio:
        """The mix of the channels (itself if mono)."""
        return self if self.channels == 1 else Audio(self.samples.mean(axis=1), self.sample_rate)


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds, as the header claims
    sample_rate: int
    channels: int
    frames: int  # as the header claims; the file may hold fewer
    format: str  # "WAV", "FLAC", "OGG", "MP3", ...
    subtype: str  # "PCM_16", "FLOAT", "VORBIS", "MPEG_LAYER_III", ...


def probe(path: str | Path) -> AudioInfo:
    """Describe an audio file from its header alone; no sample is decoded."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyAudio("The file is empty (0 bytes).")
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError:
        raise NotAudio("This file is not audio I can read; please upload WAV, FLAC, OGG or MP3.") from None
    frames = info.frames
    if info.format in ("WAV", "WAVEX"):
        claimed = _wav_claimed_frames(path)
        frames = frames if claimed is None else claimed
    return AudioInfo(
        duration=frames / info.samplerate,
        sample_rate=info.samplerate,
        channels=info.channels,
        frames=frames,
        format=info.format,
        subtype=info.subtype,
    )


def _wav_claimed_frames(path: Path) -> int | None:
    """Frames the RIFF/WAVE header claims (libsndfile reports only what is on disk); None if unknown."""
    block_align = data_bytes = None
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return None
        for _ in range(64):  # real files have a handful of chunks
            header = f.read(8)
            if len(header) < 8:
                break
            chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk_id == b"fmt ":
                body = f.read(min(size, 16))
                block_align = struct.unpack("<H", body[12:14])[0] if len(body) >= 14 else None
                f.seek(size - len(body) + (size & 1), io.SEEK_CUR)
            elif chunk_id == b"data":
                data_bytes = size
                if block_align is not None:
                    break
                f.seek(size + (size & 1), io.SEEK_CUR)
            else:
                f.seek(size + (size & 1), io.SEEK_CUR)
    # 0xFFFFFFFF marks a streamed WAV whose writer never knew its length.
    if not block_align or data_bytes in (None, 0xFFFFFFFF):
        return None
    return data_bytes // block_align


def load_clip(
    path: str | Path, *, min_seconds: float = 1.0, max_seconds: float = 60.0, max_bytes: int | None = None
) -> Audio:
    """Validate an upload (size, header, length, contents) and decode it to mono float32 at its own rate."""
    path = Path(path)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise FileTooLarge(f"The file is {megabytes(size)}; the upload limit is {megabytes(max_bytes)}.")
    info = probe(path)
    if info.frames == 0:
        raise EmptyAudio("The file contains no audio (0 samples).")
    if info.duration > max_seconds:
        raise ClipTooLong(f"The clip is {info.duration:.1f} s long; the limit is {max_seconds:g} s.")
    if info.duration < min_seconds:
        raise ClipTooShort(f"The clip is {info.duration:.2f} s long; it must be at least {min_seconds:g} s.")

    samples = _decode_mono(path, info)
    got = len(samples) / info.sample_rate
    if info.duration - got > max(LENGTH_TOLERANCE_SECONDS, LENGTH_TOLERANCE_FRACTION * info.duration):
        raise TruncatedAudio(
            f"The file is cut short: its header promises {info.duration:.1f} s but only {got:.1f} s is there."
        )
    peak = float(np.abs(samples).max())
    if peak < 10 ** (SILENCE_DBFS / 20):
        raise EmptyAudio(f"The clip is silent (every sample is below {SILENCE_DBFS:g} dBFS).")
    return Audio(samples, info.sample_rate)


def megabytes(n: int) -> str:
    return f"{n / MIB:.2f}".rstrip("0").rstrip(".") + " MB"


def _decode_mono(path: Path, info: AudioInfo) -> np.ndarray:
    """Decode block by block, mixing down as we go so memory stays at one mono copy."""
    blocks = []
    try:
        with sf.SoundFile(str(path)) as f:
            # SoundFile.blocks() ignores short reads (a cut MP3 yields uninitialised frames); read() does not.
            frames = max(1, READ_BLOCK_SAMPLES // info.channels)
            while len(block := f.read(frames, dtype="float32", always_2d=True)):
                if not np.isfinite(block).all():
                    raise NotAudio("The file contains invalid samples (NaN or infinity); please export it again.")
                blocks.append(block.mean(axis=1, dtype=np.float32))
    except sf.LibsndfileError:
        raise TruncatedAudio(
            f"The file is damaged or cut short: decoding failed before the end "
            f"of the {info.duration:.1f} s its header promises."
        ) from None
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def resample(audio: Audio, rate: int) -> Audio:
    """Band-limited resampling with soxr (high quality)."""
    if rate == audio.sample_rate:
        return audio
    return Audio(soxr.resample(audio.samples, audio.sample_rate, rate, quality="HQ"), rate)


def true_peak_dbfs(audio: Audio) -> float:
    """Peak of the 4x oversampled signal (BS.1770 true-peak estimate), in dBFS; never below the sample peak
    (soxr's anti-alias filter takes out the top of the band, where noisy audio can hold its peaks)."""
    oversampled = soxr.resample(audio.samples, audio.sample_rate, 4 * audio.sample_rate, quality="HQ")
    peak = float(max(np.abs(oversampled).max(initial=0.0), np.abs(audio.samples).max(initial=0.0)))
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def integrated_loudness(audio: Audio) -> float:
    """Integrated loudness in LUFS; -inf for silence; NaN when the clip is shorter than one 400 ms block."""
    if audio.duration <= 0.4:
        return math.nan
    return float(pyloudnorm.Meter(audio.sample_rate).integrated_loudness(audio.samples.astype(np.float64)))


def loudness_gain(audio: Audio, target_lufs: float = TARGET_LUFS, peak_dbfs: float = PEAK_DBFS) -> float:
    """The gain that brings integrated loudness to `target_lufs`, lowered where the true peak would exceed
    `peak_dbfs`. Silent or sub-400-ms audio has no defined loudness: gain 1."""
    loudness = integrated_loudness(audio)
    if not math.isfinite(loudness):
        return 1.0
    return peak_limited_gain(audio, 10 ** ((target_lufs - loudness) / 20), peak_dbfs)


def peak_limited_gain(audio: Audio, gain: float, peak_dbfs: float = PEAK_DBFS) -> float:
    """`gain`, lowered as far as needed for the true peak of `audio` scaled by it to stay at `peak_dbfs`."""
    peak = true_peak_dbfs(Audio(audio.samples * gain, audio.sample_rate))
    if peak > peak_dbfs:
        gain *= 10 ** ((peak_dbfs - peak) / 20)
    return gain


def loudness_normalize(audio: Audio, target_lufs: float = TARGET_LUFS, peak_dbfs: float = PEAK_DBFS) -> Audio:
    """Bring integrated loudness to `target_lufs`, then scale down if the true peak would exceed `peak_dbfs`."""
    return Audio(audio.samples * np.float32(loudness_gain(audio, target_lufs, peak_dbfs)), audio.sample_rate)


# ---------------------------------------------------------------------------------------------- encode

MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# Standard CBR bitrates: MPEG-1 (32-48 kHz) and MPEG-2/2.5 (below 32 kHz; MPEG-2.5 stops at 64).
MP3_KBPS_MPEG1 = (320, 256, 224, 192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 32)
MP3_KBPS_MPEG2 = (160, 144, 128, 112, 96, 80, 64, 56, 48, 40, 32, 24, 16, 8)
# Frame header + side information + Xing/LAME tag of a mono MP3, rounded up (measured: 144 is too small);
# a stereo frame's side information is 15 bytes longer.
MP3_MIN_FRAME_BYTES = 180
MP3_STEREO_SIDE_INFO_BYTES = 15
# MP3 overhead beyond bitrate x duration: Xing/LAME tag frame plus encoder delay and padding frames.
MP3_OVERHEAD_SECONDS = 0.15
# Vorbis at top quality takes 130-155 kbps on mono music (measured); with less room (per channel) we do not
# try it.
OGG_TOP_QUALITY_MIN_KBPS = 96
# Lossless FLAC of music rarely gets below this fraction of 16-bit PCM; below it we do not try.
FLAC_BEST_RATIO = 0.3


@dataclass(frozen=True)
class Encoded:
    data: bytes
    format: str  # "WAV", "FLAC", "OGG", "MP3"
    extension: str  # with the dot: ".wav"
    mime_type: str


_FORMATS = {  # name -> (soundfile format, subtype, extension, MIME type)
    "wav": ("WAV", "PCM_16", ".wav", "audio/wav"),
    "flac": ("FLAC", "PCM_16", ".flac", "audio/flac"),
    "ogg": ("OGG", "VORBIS", ".ogg", "audio/ogg"),
    "mp3": ("MP3", "MPEG_LAYER_III", ".mp3", "audio/mpeg"),
}


def mp3_rate(rate: int) -> int:
    """The sample rate an MP3 of audio at `rate` is written at: the same, or the next one MP3 offers."""
    return next((r for r in MP3_RATES if r >= rate), MP3_RATES[-1])


def _mp3_table(rate: int) -> tuple[int, ...]:
    if rate >= 32000:
        return MP3_KBPS_MPEG1
    return MP3_KBPS_MPEG2 if rate >= 16000 else tuple(b for b in MP3_KBPS_MPEG2 if b <= 64)


def mp3_bitrates(rate: int, channels: int = 1) -> tuple[int, ...]:
    """CBR bitrates (kbps, best first) for MP3 at this (MP3) sample rate, keeping only those whose frames
    can carry the LAME tag: without it a decoder adds ~50 ms of encoder delay and padding."""
    samples_per_frame = 1152 if rate >= 32000 else 576
    least = MP3_MIN_FRAME_BYTES + (channels - 1) * MP3_STEREO_SIDE_INFO_BYTES
    return tuple(b for b in _mp3_table(rate) if samples_per_frame / 8 * b * 1000 / rate >= least)


def encode(audio: Audio, fmt: str, *, bitrate_kbps: int | None = None, quality: float = 1.0) -> bytes:
    """Encode to "wav" (PCM 16-bit), "flac" (16-bit), "ogg" (Vorbis VBR at `quality` 0..1, 1 best) or
    "mp3" (constant `bitrate_kbps`, default the highest; audio at a rate MP3 lacks is resampled to `mp3_rate`)."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; expected one of {sorted(_FORMATS)}")
    sf_format, subtype, _, _ = _FORMATS[fmt]
    options: dict = {}
    if fmt == "ogg":
        if not 0.0 <= quality <= 1.0:
            raise ValueError(f"Vorbis quality must be within 0..1, not {quality}")
        options["compression_level"] = 1.0 - quality
    if fmt == "mp3":
        audio = resample(audio, mp3_rate(audio.sample_rate))
        options.update(
            bitrate_mode="CONSTANT", compression_level=_mp3_compression_level(audio.sample_rate, bitrate_kbps)
        )
    samples = np.clip(audio.samples, -1.0, 1.0)  # libsndfile wraps, rather than clips, out-of-range floats
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", audio.sample_rate, audio.channels, subtype, format=sf_format, **options) as f:
        # One big write overflows libvorbis' stack past ~90 s (libsndfile#1095): write in blocks.
        for start in range(0, len(samples), WRITE_BLOCK_FRAMES):
            f.write(samples[start : start + WRITE_BLOCK_FRAMES])
    return buffer.getvalue()


def _mp3_compression_level(rate: int, bitrate_kbps: int | None) -> float:
    # libsndfile maps level c to int(max - c * (max - min)) kbps; LAME then takes the nearest standard rate.
    # The 0.25 keeps the float product from truncating one below the wanted rate.
    table = _mp3_table(rate)
    best, worst = table[0], table[-1]
    kbps = best if bitrate_kbps is None else bitrate_kbps
    return min(max((best - kbps - 0.25) / (best - worst), 0.0), 1.0)


def write(audio: Audio, path: str | Path) -> None:
    """Write to `path` in the format its suffix names (.wav, .flac, .ogg, .mp3)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    path.write_bytes(encode(audio, fmt))


def encode_to_fit(audio: Audio, max_bytes: int) -> Encoded:
    """The best-quality encoding within `max_bytes`: WAV, else FLAC, else Ogg Vorbis at top quality,
    else MP3 at the highest constant bitrate that fits. Sizes are predicted where arithmetic can."""
    wav_bytes = 44 + 2 * audio.samples.size
    if wav_bytes <= max_bytes:
        return _encoded(audio, "wav")
    if wav_bytes * FLAC_BEST_RATIO <= max_bytes:
        flac = _encoded(audio, "flac")
        if len(flac.data) <= max_bytes:
            return flac
    if max_bytes * 8 >= OGG_TOP_QUALITY_MIN_KBPS * 1000 * audio.channels * audio.duration:
        ogg = _encoded(audio, "ogg", quality=1.0)
        if len(ogg.data) <= max_bytes:
            return ogg
    bitrates = mp3_bitrates(mp3_rate(audio.sample_rate), audio.channels)
    for kbps in bitrates:
        if kbps * 125 * (audio.duration + MP3_OVERHEAD_SECONDS) > max_bytes:
            continue
        mp3 = _encoded(audio, "mp3", bitrate_kbps=kbps)
        if len(mp3.data) <= max_bytes:
            return mp3
    raise OutputTooLarge(
        f"The {audio.duration:.0f} s track does not fit the {megabytes(max_bytes)} upload limit, "
        f"not even as {bitrates[-1]} kbps MP3."
    )


def _encoded(audio: Audio, fmt: str, **options) -> Encoded:
    sf_format, _, extension, mime_type = _FORMATS[fmt]
    return Encoded(encode(audio, fmt, **options), sf_format, extension, mime_type)
