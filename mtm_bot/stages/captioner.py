"""LP-MusicCaps-compatible music captioner: 10 s segments of audio in, one English caption each out.

Our own implementation of the reference's `BartCaptionModel` (docs/ARCHITECTURE.md, "The captioner").
Module and buffer names follow the reference exactly, so its `transfer.pth` loads with strict=True:

    audio_encoder.mel_encoder.spec_fn.window      Hann window (torchaudio Spectrogram's buffer)
    audio_encoder.mel_encoder.mel_scale.fb        mel filter bank (torchaudio MelScale's buffer)
    audio_encoder.conv1 / conv_stack.{0..4}       Conv1d front end, 1001 mel frames -> 32 frames
    audio_encoder.positional_embedding            fixed sinusoids, added before BART's encoder
    bart.*                                        BartForConditionalGeneration (bart-base)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.audio_utils import mel_filter_bank
from transformers.modeling_outputs import BaseModelOutput

from ..core.audio import Audio, resample
from ..core.errors import ClipTooShort
from ..core.progress import CancelToken
from .batcher import CallBatcher
from .checkpoints import BART_REPO
from .checkpoints import LP_MUSICCAPS_FILE as CHECKPOINT_FILE
from .checkpoints import LP_MUSICCAPS_REPO as CHECKPOINT_REPO
from .runtime import cast_for_inference, from_hub, model_dtype

SAMPLE_RATE = 16_000
SEGMENT_SECONDS = 10
SEGMENT_SAMPLES = SAMPLE_RATE * SEGMENT_SECONDS
MIN_SEGMENT_SECONDS = 1.0  # a shorter trailing piece is dropped; a shorter clip is refused
N_FFT = 1024
HOP = 160  # 10 ms
N_MELS = 128
F_MAX = 8000.0
N_STRIDED_CONVS = 5
N_CTX = SEGMENT_SAMPLES // HOP // 2**N_STRIDED_CONVS + 1  # 32 frames into BART's encoder

# Decoding as the reference ran it (num_beams=5, max_length=128, min_length=2, bart-base's
# no_repeat_ngram_size=3 and early stopping).
NUM_BEAMS = 5
MAX_TOKENS = 128


@dataclass(frozen=True)
class Segment:
    start: float  # seconds in the input clip
    end: float
    caption: str


# ---------------------------------------------------------------------------------------------------------
# Front end


def mel_filters(dtype: torch.dtype = torch.float32) -> Tensor:
    """(513, 128) triangular filters, 0-8000 Hz on the HTK mel scale, no area normalisation."""
    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=F_MAX,
        sampling_rate=SAMPLE_RATE,
        norm=None,
        mel_scale="htk",
    )
    return torch.from_numpy(filters).to(dtype)


def log_mel_spectrogram(waves: Tensor, window: Tensor, filters: Tensor) -> Tensor:
    """(batch, samples) -> (batch, 128, frames) in dB; 1001 frames per 10 s segment.

    Power is the *real part* squared, not |X|^2: the reference computes it that way and the weights
    were trained on it.
    """
    spec = torch.stft(
        waves,
        N_FFT,
        hop_length=HOP,
        win_length=N_FFT,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    power = spec.real.square()
    mel = torch.matmul(power.transpose(-1, -2), filters).transpose(-1, -2)
    return 10.0 * torch.log10(mel.clamp(min=1e-10))


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> Tensor:
    """Fixed positional table (length, channels): sin in the first half of the channels, cos in the second.

    Channel i < channels/2 has timescale max_timescale ** (i / (channels/2 - 1)), so the geometric
    progression ends exactly at max_timescale. This is the layout of OpenAI Whisper's encoder table
    (MIT licence), which LP-MusicCaps adopted and its checkpoint was trained with.
    """
    half = channels // 2
    timescales = max_timescale ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = torch.arange(length, dtype=torch.float64)[:, None] / timescales
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class _Buffer(nn.Module):
    """Holds one buffer under the name the reference's torchaudio module gave it (checkpoint key layout)."""

    def __init__(self, name: str, value: Tensor) -> None:
        super().__init__()
        self.register_buffer(name, value)


class MelEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spec_fn = _Buffer("window", torch.hann_window(N_FFT))
        self.mel_scale = _Buffer("fb", mel_filters())

    def forward(self, waves: Tensor) -> Tensor:
        return log_mel_spectrogram(waves, self.spec_fn.get_buffer("window"), self.mel_scale.get_buffer("fb"))


class AudioEncoder(nn.Module):
    """Waveforms (batch, 160 000) -> BART encoder inputs (batch, 32, d_model)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mel_encoder = MelEncoder()
        self.conv1 = nn.Conv1d(N_MELS, dim, kernel_size=3, padding=1)
        self.conv_stack = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1) for _ in range(N_STRIDED_CONVS)
        )
        self.register_buffer("positional_embedding", sinusoids(N_CTX, dim))

    def forward(self, waves: Tensor) -> Tensor:
        x = self.mel_encoder(waves.float())  # the front end always runs in fp32
        x = F.gelu(self.conv1(x.to(self.conv1.weight.dtype)))
        for conv in self.conv_stack:
            x = F.gelu(conv(x))
        return x.transpose(1, 2) + self.get_buffer("positional_embedding")


class LPMusicCaps(nn.Module):
    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.audio_encoder = AudioEncoder(config.d_model)
        self.bart = BartForConditionalGeneration(config)

    def encode(self, waves: Tensor) -> BaseModelOutput:
        return self.bart.model.encoder(inputs_embeds=self.audio_encoder(waves), return_dict=True)

    def generate(self, waves: Tensor, generation: GenerationConfig, cancels: Sequence[CancelToken] = ()) -> Tensor:
        """Beam-search token ids for a batch of 10 s waveforms, all in one batch; it stops (Cancelled) once
        every one of `cancels` is cancelled."""
        stopping = StoppingCriteriaList([_CheckCancel(list(cancels))] if cancels else [])
        return self.bart.generate(
            encoder_outputs=self.encode(waves), generation_config=generation, stopping_criteria=stopping
        )


class _CheckCancel(StoppingCriteria):
    """Raises `Cancelled` at the next decode step once every job of the batch is cancelled (a job cancelled
    alone leaves its batch at once, CallBatcher); never stops by itself."""

    def __init__(self, cancels: list[CancelToken]) -> None:
        self.cancels = cancels

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        if all(cancel.cancelled for cancel in self.cancels):
            self.cancels[0].check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generation_config(config: BartConfig) -> GenerationConfig:
    return GenerationConfig(
        num_beams=NUM_BEAMS,
        max_length=MAX_TOKENS,
        min_length=2,
        no_repeat_ngram_size=3,
        early_stopping=True,
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        # Training targets were "<s> caption </s>" after the start token "</s>": force the "<s>" as
        # bart-base's generation defaults do.
        forced_bos_token_id=config.bos_token_id,
        forced_eos_token_id=config.eos_token_id,
    )


# ---------------------------------------------------------------------------------------------------------
# Segmenting


def split_segments(samples: np.ndarray, duration: float) -> tuple[Tensor, list[tuple[float, float]]]:
    """16 kHz mono samples -> (n, 160 000) zero-padded segments and their (start, end) in seconds.

    The count comes from the clip's true `duration` (resampling may round a sample off): a trailing
    piece shorter than MIN_SEGMENT_SECONDS is dropped, and the last kept segment ends at the clip's end.
    """
    n = math.ceil(duration / SEGMENT_SECONDS)
    if n and duration - (n - 1) * SEGMENT_SECONDS < MIN_SEGMENT_SECONDS:
        n -= 1
    if n == 0:
        raise ClipTooShort(
            f"The clip is {duration:.1f} s long; captioning needs at least {MIN_SEGMENT_SECONDS:g} s of audio."
        )
    waves = torch.zeros(n, SEGMENT_SAMPLES)
    kept = torch.from_numpy(np.ascontiguousarray(samples[: n * SEGMENT_SAMPLES], dtype=np.float32))
    waves.view(-1)[: len(kept)] = kept
    bounds = [(float(i * SEGMENT_SECONDS), float(min((i + 1) * SEGMENT_SECONDS, duration))) for i in range(n)]
    return waves, bounds


# ---------------------------------------------------------------------------------------------------------
# The captioner


class Captioner:
    def __init__(
        self,
        model: LPMusicCaps,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_batch: int = 4,
    ) -> None:
        """`model` in float32; all but the mel front end (window, filter bank, STFT, dB) is cast to `dtype`
        (default: half precision on CUDA), so the front end never passes through half-precision rounding.
        Clips of up to `max_batch` jobs captioning at the same time go through the model as one batch."""
        self.model = cast_for_inference(model.to(device), dtype or model_dtype(device), keep_fp32=["mel_encoder"])
        self.model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.generation = generation_config(model.bart.config)
        self.batches = CallBatcher(self._caption_batch, max_batch)

    @classmethod
    def load(
        cls, profile: str, device: torch.device, dtype: torch.dtype | None = None, max_batch: int = 4
    ) -> Captioner:
        if profile == "tiny":
            return cls.tiny(device, dtype, max_batch)
        if profile != "full":
            raise ValueError(f"unknown profile {profile!r}")
        from huggingface_hub import hf_hub_download
        from transformers import AutoTokenizer

        path = from_hub(CHECKPOINT_REPO, lambda: hf_hub_download(CHECKPOINT_REPO, CHECKPOINT_FILE))
        config = from_hub(BART_REPO, lambda: BartConfig.from_pretrained(BART_REPO))
        tokenizer = from_hub(BART_REPO, lambda: AutoTokenizer.from_pretrained(BART_REPO))
        return cls.from_checkpoint(path, config, tokenizer, device, dtype, max_batch)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: BartConfig,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_batch: int = 4,
    ) -> Captioner:
        """Build the architecture from `config` and load a reference-layout checkpoint strictly.

        The file is a dict whose `state_dict` holds every weight and buffer (it also carries the
        optimizer state, which mmap keeps out of memory).
        """
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = LPMusicCaps(config)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return cls(model, tokenizer, device, dtype, max_batch)

    @classmethod
    def tiny(cls, device: torch.device, dtype: torch.dtype | None = None, max_batch: int = 4) -> Captioner:
        """Same architecture and front end at toy width, random weights, built offline (tests, CI)."""
        from transformers import PreTrainedTokenizerFast

        from .tiny import byte_level_bpe

        specials = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # BART's ids 0, 1, 2, 3 and the mask
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=byte_level_bpe(512, specials),
            bos_token="<s>",
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            mask_token="<mask>",
        )
        config = tiny_config(len(tokenizer))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same toy model every time
            model = LPMusicCaps(config)
        return cls(model, tokenizer, device, dtype, max_batch)

    def caption(self, audio: Audio, cancel: CancelToken | None = None) -> list[Segment]:
        """Caption every 10 s segment of the clip; all segments go through the model as one batch, with
        those of the other jobs captioning at the same time (any thread may call this)."""
        clip = resample(audio, SAMPLE_RATE)
        waves, bounds = split_segments(clip.samples, audio.duration)
        if cancel is not None:
            cancel.check()
        captions = self.batches(waves, cancel)
        return [Segment(start, end, text.strip()) for (start, end), text in zip(bounds, captions)]

    @torch.inference_mode()
    def _caption_batch(self, clips: list[Tensor], cancels: list[CancelToken | None]) -> list[list[str]]:
        """Each clip's segments (n_i, 160 000) -> its n_i captions, every segment in one beam search."""
        ids = self.model.generate(
            torch.cat(clips).to(self.device),
            self.generation,
            [c if c is not None else CancelToken() for c in cancels] if any(cancels) else [],
        )
        captions = iter(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return [[next(captions) for _ in range(len(waves))] for waves in clips]


def bart_base_config() -> BartConfig:
    """facebook/bart-base's architecture (the checkpoint's decoder), for building the full-size model offline."""
    return BartConfig(
        vocab_size=50265,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
    )


def tiny_config(vocab_size: int) -> BartConfig:
    # init_std 1.0 (BART's default is 0.02): at toy width small random weights wash the audio out and
    # every segment gets the same text; larger ones let the audio visibly steer the captions.
    return BartConfig(
        init_std=1.0,
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )


def download() -> None:
    """Fetch everything the full profile needs into the Hugging Face cache (network required)."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    hf_hub_download(CHECKPOINT_REPO, CHECKPOINT_FILE)
    BartConfig.from_pretrained(BART_REPO)
    AutoTokenizer.from_pretrained(BART_REPO)
