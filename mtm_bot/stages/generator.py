"""MusicGen generation: plan output blocks, compute melody chroma, generate block by block, join seamlessly.

Block 1 is conditioned on the chroma of input segment 1 and description 1. Every later block is a
continuation: its audio prompt is the last PROMPT_SECONDS of the previous block's *codes* (exactly what
EnCodec would give for that audio, with no lossy decode/encode round trip), plus its own description
and, by default, the chroma of its input segment (after the prompt audio's own chroma, so the melody
lines up with the new frames). Where a bass line lies under the melody, chroma is taken after a
high-pass that removes it and the kick drum: our cheap stand-in for the drum- and bass-free stems
MusicGen-melody was trained on (mtm_bot.stages.melody); a hummed or sung tune keeps its low fundamentals.
Each block's decoded prompt is trimmed except for a short overlap, where the two
decodes of the same codes are crossfaded (equal gain: they are coherent), placed before the earlier
decode's right edge (EnCodec's decoder looks ahead). The joined track is what one EnCodec pass over all
the codes would give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from ..core.audio import PEAK_DBFS, Audio, peak_limited_gain, resample
from ..core.progress import CancelToken, Progress, ProgressCallback, ignore_progress
from .batcher import BlockBatcher
from .compiling import CompilePlan, warm_up_or_run_eager
from .melody import has_bass_line, remove_bass
from .musicgen_decode import MAX_TEXT_TOKENS, BlockRequest, MusicgenDecoder
from .runtime import cast_for_inference, from_hub, model_dtype

SAMPLE_RATE = 32000
FRAME_RATE = 50  # EnCodec frames (MusicGen decode steps) per second
SAMPLES_PER_FRAME = SAMPLE_RATE // FRAME_RATE
MAX_FRAMES = 1500  # MusicGen's 30 s context (its generation_config.max_length)
# 3.2 s: whole EnCodec frames that are also whole chroma hops (20480 samples = 32 frames = 5 hops), so
# a continuation's chroma frames start exactly where its new frames do.
PROMPT_SECONDS = 3.2
PROMPT_FRAMES = round(PROMPT_SECONDS * FRAME_RATE)
CROSSFADE_SECONDS = 0.05
# EnCodec-32kHz's decoder is non-causal: the last ~80 ms of a decode lack their right context and differ
# from a continuous decode. Seams fade this far before the end of the earlier block, where both decodes agree.
EDGE_SECONDS = 0.1

# Chroma as MusicgenMelodyFeatureExtractor computes it (transformers 5.23).
CHROMA_N_FFT = 16384
CHROMA_HOP = 4096
CHROMA_BINS = 12
CHROMA_MAX_SAMPLES = 30 * SAMPLE_RATE
CHROMA_LENGTH = 235  # config.chroma_length: the frames of 30 s the model attends to

TINY_CODEBOOK_SIZE = 64


@dataclass(frozen=True)
class Checkpoint:
    """The layout of a MusicGen checkpoint: the tiny profile builds the same layout in its place."""

    melody: bool  # chroma-conditioned (the melody family); else text only (cross-attention)
    stereo: bool  # 8 codebooks, left and right interleaved; else 4, mono
    large: bool = False  # the 3.3 B decoder (tiny: wider, one more layer, more heads)


# Every MusicGen checkpoint MTM_MUSICGEN_ID may name (README: their sizes, memory and what users hear).
CHECKPOINTS = {
    "facebook/musicgen-melody": Checkpoint(melody=True, stereo=False),
    "facebook/musicgen-melody-large": Checkpoint(melody=True, stereo=False, large=True),
    "facebook/musicgen-stereo-melody": Checkpoint(melody=True, stereo=True),
    "facebook/musicgen-stereo-melody-large": Checkpoint(melody=True, stereo=True, large=True),
    "facebook/musicgen-small": Checkpoint(melody=False, stereo=False),
    "facebook/musicgen-medium": Checkpoint(melody=False, stereo=False),
    "facebook/musicgen-large": Checkpoint(melody=False, stereo=False, large=True),
    "facebook/musicgen-stereo-small": Checkpoint(melody=False, stereo=True),
    "facebook/musicgen-stereo-medium": Checkpoint(melody=False, stereo=True),
    "facebook/musicgen-stereo-large": Checkpoint(melody=False, stereo=True, large=True),
}


def checkpoint_layout(model_id: str) -> Checkpoint:
    """The layout of `model_id`: from the table, else read from its name (a fine-tune keeps its base's
    name parts), which is all the tiny profile needs."""
    name = model_id.rsplit("/", 1)[-1]
    return CHECKPOINTS.get(model_id) or Checkpoint(
        melody="melody" in name, stereo="stereo" in name, large="large" in name
    )


@dataclass(frozen=True)
class Block:
    index: int
    start: float  # output seconds
    end: float
    segment: int  # input segment guiding this block (cycling when the output outlasts the clip)
    melody_start: float  # that segment's range in the clip, seconds
    melody_end: float
    description: str = ""  # MusicGen text prompt


def plan_blocks(
    duration: float, segments: list[tuple[float, float]], block_seconds: float, start: float = 0.0, first_index: int = 0
) -> list[Block]:
    """Blocks from `start` to `duration` seconds, each `block_seconds` long but the last; block i follows
    segment i mod n. An extension plans from the end of the track it extends, numbering on from
    `first_index` so the captions (and the melody) keep cycling where the track left off."""
    if duration <= start or block_seconds <= 0:
        raise ValueError(f"need start < duration and positive blocks, got {start}, {duration} and {block_seconds}")
    if not segments:
        raise ValueError("at least one input segment is needed to plan blocks")
    count = math.ceil((duration - start) / block_seconds - 1e-9)
    blocks = []
    for i in range(first_index, first_index + count):
        segment = i % len(segments)
        begin = start + (i - first_index) * block_seconds
        melody_start, melody_end = segments[segment]
        blocks.append(Block(i, begin, min(begin + block_seconds, duration), segment, melody_start, melody_end))
    return blocks


@dataclass
class Rendered:
    """A generated track and every code it was decoded from: what a continuation starts from."""

    audio: Audio  # 32 kHz, mono or stereo as the checkpoint makes it
    codes: torch.Tensor  # (1, K, frames); frame f is samples [f, f + 1) * SAMPLES_PER_FRAME of `audio`
    gain: float = 1.0  # what the decoded audio of its last generated part was scaled by

    def until(self, seconds: float) -> Rendered:
        """The first `seconds` of the track and their codes (a redo keeps these and generates the rest)."""
        frames = _frames_until(seconds)
        if frames * SAMPLES_PER_FRAME != round(seconds * SAMPLE_RATE):
            raise ValueError(f"{seconds} s does not fall on an EnCodec frame")
        if frames > self.codes.shape[-1]:
            raise ValueError(f"the track has {self.codes.shape[-1]} frames, not {frames}")
        return Rendered(
            Audio(self.audio.samples[: frames * SAMPLES_PER_FRAME], SAMPLE_RATE), self.codes[..., :frames], self.gain
        )


@cache
def _chroma_filters() -> torch.Tensor:
    from transformers.audio_utils import chroma_filter_bank

    bank = chroma_filter_bank(
        num_frequency_bins=CHROMA_N_FFT, num_chroma=CHROMA_BINS, sampling_rate=SAMPLE_RATE, tuning=0
    )
    return torch.from_numpy(bank).float()  # (12, n_fft // 2 + 1)


def melody_chroma(samples: np.ndarray, prompt_samples: int = 0, filter_bass: bool = True) -> torch.Tensor:
    """One-hot chroma (CHROMA_LENGTH, 12) of 32 kHz mono audio: the melody MusicGen-melody is conditioned on.

    MusicGen-melody was trained on the chroma of the mix without drums and bass (demucs stems); we
    approximate that with a high-pass (mtm_bot.stages.melody.remove_bass; `filter_bass=False` skips it), applied
    only where the low band of the melody (after the prompt) carries a line of its own
    (mtm_bot.stages.melody.has_bass_line): it raises the frames
    showing the melody's pitch class on band renderings of Bach chorales, and would cut the fundamentals
    of a hummed or sung tune (bench/melody_agreement.py).
    Then the definition of transformers' MusicgenMelodyFeatureExtractor:
    at most 30 s, zero-padded to one FFT window if shorter, centred (reflect) STFT with
    a periodic Hann window normalised by its L2 norm, power 2, chroma filter bank, max-normalised,
    then only the strongest pitch class kept per frame; short chroma is tiled to 235 frames.

    For a continuation, `samples` begins with `prompt_samples` of prompt audio: the frames centred in it
    are kept once and only the melody after them is tiled, as audiocraft tiles only the
    reference melody (tiling both would bring the prompt's pitches back inside the new frames).
    """
    audio = np.asarray(samples, dtype=np.float32)[:CHROMA_MAX_SAMPLES]
    # Judged on the user's melody alone, as for a first block: MusicGen's own bass in a continuation's
    # prompt must not decide that a hum's low fundamentals be cut.
    if filter_bass and has_bass_line(audio[prompt_samples:], SAMPLE_RATE):
        audio = remove_bass(audio, SAMPLE_RATE)
    wave = torch.as_tensor(audio)
    if wave.numel() < CHROMA_N_FFT:
        missing = CHROMA_N_FFT - wave.numel()
        wave = torch.nn.functional.pad(wave, (missing // 2, missing - missing // 2))
    window = torch.hann_window(CHROMA_N_FFT)
    stft = torch.stft(
        wave, CHROMA_N_FFT, CHROMA_HOP, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = (stft / window.pow(2).sum().sqrt()).abs().pow(2)  # (freq, frames)
    chroma = _chroma_filters() @ power  # (12, frames)
    chroma = chroma / chroma.abs().amax(dim=0, keepdim=True).clamp_min(1e-6)
    one_hot = torch.nn.functional.one_hot(chroma.argmax(dim=0), CHROMA_BINS).float()  # (frames, 12)
    prompt_hops = -(-prompt_samples // CHROMA_HOP)  # frames centred inside the prompt
    kept, melody = one_hot[:prompt_hops], one_hot[prompt_hops:]
    repeats = math.ceil((CHROMA_LENGTH - len(kept)) / len(melody))
    return torch.cat([kept, melody.repeat(repeats, 1)])[:CHROMA_LENGTH]


def crossfade(head: np.ndarray, tail: np.ndarray, overlap: int) -> np.ndarray:
    """Join `head` and `tail`, fading head's last `overlap` samples into tail's first `overlap`.

    Equal-gain raised-cosine fade (fade_in + fade_out = 1, flat at both ends): both sides of a block
    seam decode the same codes, so they are coherent and an equal-power fade would lift the seam by up
    to 3 dB; with equal gain, identical material passes through unchanged.
    """
    if overlap == 0:
        return np.concatenate([head, tail])
    fade_in = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
    if head.ndim == 2:  # stereo: the same fade on both channels
        fade_in = fade_in[:, None]
    mixed = head[-overlap:] * (1 - fade_in) + tail[:overlap] * fade_in
    return np.concatenate([head[:-overlap], mixed.astype(head.dtype), tail[overlap:]])


class Generator:
    """A resident MusicGen model (melody or text-only) that renders planned blocks into one track."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        block_seconds: float,
        melody_on_continuations: bool = True,
        compile: bool | None = None,
        max_batch: int = 1,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.uses_melody = model.config.model_type == "musicgen_melody"
        self.channels = model.decoder.config.audio_channels  # 2: a stereo checkpoint
        self.melody_on_continuations = melody_on_continuations
        self.block_seconds = block_seconds
        self.decoder = MusicgenDecoder(model, max_frames=cache_frames(block_seconds), compile=compile)
        # Jobs generating at the same time share decode loops (mtm_bot.stages.batcher); `generate` may be called
        # from several threads at once.
        self.batcher = BlockBatcher(
            lambda blocks, max_blocks, admit: self.decoder.decode_blocks(blocks, max_blocks=max_blocks, admit=admit),
            max_batch,
        )

    @classmethod
    def load(
        cls,
        profile: str,
        model_id: str,
        device: torch.device,
        block_seconds: float,
        dtype: torch.dtype | None = None,
        compile: CompilePlan | None = None,
        max_batch: int = 1,
    ) -> Generator:
        """The model for `profile`, resident on `device` (half precision on CUDA), its decode step compiled.

        Weights load in float32; the text encoder, the projections and the decoder are then cast to
        `dtype` (T5's `wo` stays float32 under fp16), and EnCodec stays float32: it is small and makes
        the audible output.
        """
        dtype = dtype or model_dtype(device)
        if profile == "tiny":
            layout = checkpoint_layout(model_id)
            model, tokenizer = build_tiny_musicgen(
                "melody" if layout.melody else "small", stereo=layout.stereo, large=layout.large
            )
        else:
            model, tokenizer = _load_pretrained(model_id)
        model = cast_for_inference(model.to(device), dtype, keep_fp32=["audio_encoder"])
        plan = compile or CompilePlan.from_setting("auto", device)
        generator = cls(model, tokenizer, device, block_seconds, compile=plan.enabled, max_batch=max_batch)

        # Allocate the buffers for max_batch blocks and compile and capture now (one graph per batch-size
        # bucket), on the thread that will decode, not on a user's first request.
        def warm_up() -> None:
            generator.batcher.call(lambda: generator.decoder.warmup(max_batch=max_batch))

        if not warm_up_or_run_eager("MusicGen's decode step", plan, warm_up, generator.decoder.run_eager):
            warm_up()  # eager: allocation only
        return generator

    def generate(
        self,
        clip: Audio | None,
        blocks: list[Block],
        seed: int,
        progress: ProgressCallback = ignore_progress,
        cancel: CancelToken | None = None,
        start: Rendered | None = None,
        gain: float = 1.0,
    ) -> Rendered:
        """Render `blocks` in order; the result is 32 kHz (stereo from a stereo checkpoint, else mono) and
        exactly as long as the blocks together.

        Without a clip there is no melody: every block takes MusicGen's null-melody conditioning (and its
        description), and later blocks still continue the previous one.

        With `start` (a kept track cut at a frame), the blocks continue it: its last codes prompt the first
        block, and the result is `start`'s audio sample for sample up to the seam's crossfade, then the new
        blocks, whose decoded audio is scaled by `gain` (the loudness gain `start` was delivered at), lowered
        where that would take the new part's true peak over PEAK_DBFS (the result's `gain` says).
        """
        _check_contiguous(blocks, 0.0 if start is None else start.audio.duration)
        if start is not None and start.codes.shape[1] != self.decoder.num_codebooks:
            raise ValueError(
                f"the kept track has {start.codes.shape[1]} codebooks, this model "
                f"{self.decoder.num_codebooks}: it cannot continue it"
            )
        cancel = cancel or CancelToken()
        melody = resample(clip, SAMPLE_RATE).samples if self.uses_melody and clip is not None else None
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._generate(melody, blocks, generator, progress, cancel, start, gain)

    def _generate(
        self,
        melody: np.ndarray | None,
        blocks: list[Block],
        generator: torch.Generator,
        progress: ProgressCallback,
        cancel: CancelToken,
        start: Rendered | None,
        gain: float,
    ) -> Rendered:
        # `kept`: start's audio, as delivered; `new`: the new blocks' audio at unit gain, from where it fades
        # in over the end of `kept` (`fade` samples). The new part's gain is chosen once all of it is there.
        empty = np.zeros((0,) if self.channels == 1 else (0, self.channels), dtype=np.float32)
        kept = empty if start is None else start.audio.samples
        new: np.ndarray | None = None
        fade = 0
        # every code so far, (1, K, frames); frame f is output samples [f, f + 1) * SAMPLES_PER_FRAME
        codes = None if start is None else start.codes.to(self.device)
        for number, block in enumerate(blocks, start=1):

            def on_step(step: int, steps: int, number: int = number) -> None:
                cancel.check()
                progress(Progress("generating", block=number, blocks=len(blocks), step=step, steps=steps))

            prompt = None if codes is None else codes[..., -PROMPT_FRAMES:]
            prompt_audio = None
            if prompt is not None:  # for its chroma, whose frames are max-normalised: the gains do not matter
                so_far = kept if new is None else np.concatenate([kept[: len(kept) - fade], new])
                prompt_audio = so_far[len(so_far) - prompt.shape[-1] * SAMPLES_PER_FRAME :]
                if prompt_audio.ndim == 2:  # the melody of the mix, as the clip's
                    prompt_audio = prompt_audio.mean(axis=1)
            block_codes = self._generate_block(block, melody, prompt, prompt_audio, generator, on_step, cancel)
            audio = self._decode(block_codes)
            if codes is None or prompt is None:  # the first block of a new track
                new, codes = audio, block_codes
                continue
            # The re-decoded prompt replaces the earlier block's edge and fades in just before it; the rest
            # of the prompt is trimmed.
            seam = prompt.shape[-1] * SAMPLES_PER_FRAME  # where the new frames start in `audio`
            edge = min(round(EDGE_SECONDS * SAMPLE_RATE), seam // 2)
            overlap = min(round(CROSSFADE_SECONDS * SAMPLE_RATE), seam - edge)
            if new is None:  # the first block after the kept part
                kept, new, fade = kept[: len(kept) - edge], audio[seam - edge - overlap :], overlap
            else:
                new = crossfade(new[: len(new) - edge], audio[seam - edge - overlap :], overlap)
            codes = torch.cat([codes, block_codes[..., prompt.shape[-1] :]], dim=-1)
        assert new is not None and codes is not None, "no block was generated"
        if start is not None:
            gain = peak_limited_gain(Audio(new[fade:], SAMPLE_RATE), gain, PEAK_DBFS)
        track = crossfade(kept, new * np.float32(gain), fade)
        return Rendered(Audio(track[: round(blocks[-1].end * SAMPLE_RATE)], SAMPLE_RATE), codes.cpu(), gain)

    def _generate_block(
        self,
        block: Block,
        melody: np.ndarray | None,
        prompt: torch.Tensor | None,
        prompt_audio: np.ndarray | None,
        seed_generator: torch.Generator,
        on_step,
        cancel: CancelToken,
    ) -> torch.Tensor:
        """Codes (1, K, prompt + new frames) for one block: its description, its segment's chroma, the prompt.

        The model reads chroma frame by frame alongside the audio frames (as in training, where both come
        from the same audio), so a continuation's chroma is that of the prompt audio, then its segment's.
        """
        new_frames = _frames_until(block.end) - _frames_until(block.start)
        if block.end - block.start > self.block_seconds + 1e-9:
            raise ValueError(
                f"block {block.index} ({block.start}-{block.end} s) is longer than the "
                f"{self.block_seconds} s blocks this generator was sized for"
            )
        chroma = None
        if melody is not None and (prompt is None or self.melody_on_continuations):
            segment = melody[round(block.melody_start * SAMPLE_RATE) : round(block.melody_end * SAMPLE_RATE)]
            if prompt_audio is None:
                chroma = melody_chroma(segment)
            else:
                chroma = melody_chroma(np.concatenate([prompt_audio, segment]), prompt_samples=len(prompt_audio))
            chroma = chroma[None].to(self.device)
        text = self.tokenizer(
            [block.description], return_tensors="pt", padding=True, truncation=True, max_length=MAX_TEXT_TOKENS
        ).to(self.device)
        return self.batcher.decode(
            BlockRequest(text.input_ids, text.attention_mask, new_frames, chroma, prompt, seed_generator, on_step),
            cancel,
        )

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> np.ndarray:
        """EnCodec-decode (1, K, frames) codes to frames * SAMPLES_PER_FRAME float32 samples: (n,), or (n, 2)
        for a stereo checkpoint, whose interleaved codebooks EnCodec decodes as two mono streams (as
        transformers: the even codebooks are the left channel, the odd ones the right)."""
        streams = [codes] if self.channels == 1 else [codes[:, 0::2], codes[:, 1::2]]
        channels = []
        for stream in streams:
            audio = self.model.audio_encoder.decode(stream[None], audio_scales=[None]).audio_values
            samples = audio[0, 0].float().cpu().numpy()
            if len(samples) < codes.shape[-1] * SAMPLES_PER_FRAME:
                raise RuntimeError(f"EnCodec returned {len(samples)} samples for {codes.shape[-1]} frames")
            channels.append(samples[: codes.shape[-1] * SAMPLES_PER_FRAME])
        return channels[0] if self.channels == 1 else np.stack(channels, axis=1)


def cache_frames(block_seconds: float) -> int:
    """Frames the decoder's KV cache holds: one block and its prompt, not MusicGen's whole 30 s. Every
    step of the captured graph reads the whole cache, so for 10 s blocks this about halves those reads."""
    frames = PROMPT_FRAMES + _frames_until(block_seconds) + 1  # + 1: a block's ends needn't sit on frames
    if frames > MAX_FRAMES:
        raise ValueError(f"{block_seconds} s blocks and a {PROMPT_SECONDS} s prompt exceed MusicGen's 30 s context")
    return frames


def _frames_until(seconds: float) -> int:
    """Frames generated once the output reaches `seconds` (whole frames, so the last may run past it)."""
    return math.ceil(round(seconds * SAMPLE_RATE) / SAMPLES_PER_FRAME)


def _check_contiguous(blocks: list[Block], start: float) -> None:
    """Blocks tile the output from `start` seconds without gaps, as plan_blocks makes them."""
    if not blocks or abs(blocks[0].start - start) > 1e-6 or any(b.start != a.end for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"blocks must start at {start} s and follow each other without gaps")


def _load_pretrained(model_id: str):
    """The hub checkpoint in float32: MusicGen-melody, or a text-only MusicGen (then no chroma)."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        MusicgenForConditionalGeneration,
        MusicgenMelodyForConditionalGeneration,
    )

    from ..core.settings import SettingsError

    config = from_hub(model_id, lambda: AutoConfig.from_pretrained(model_id))
    classes: dict[str, Any] = {
        "musicgen_melody": MusicgenMelodyForConditionalGeneration,
        "musicgen": MusicgenForConditionalGeneration,
    }
    if config.model_type not in classes:
        raise SettingsError(f"MTM_MUSICGEN_ID={model_id} is a {config.model_type!r} model, not a MusicGen checkpoint.")
    model = from_hub(model_id, lambda: classes[config.model_type].from_pretrained(model_id, dtype=torch.float32))
    tokenizer = from_hub(model_id, lambda: AutoTokenizer.from_pretrained(model_id))
    return model.eval(), tokenizer


def build_tiny_musicgen(kind: str = "melody", stereo: bool = False, large: bool = False):
    """A tiny, randomly initialised MusicGen ("melody" or "small") and its tokenizer, built offline.

    Same architectures and audio framing as the real checkpoints (32 kHz, EnCodec at 50 frames/s with
    4 codebooks per channel, one-step delay pattern; `stereo`: 8 codebooks, left and right interleaved,
    as the stereo checkpoints), small enough to run a 30 s block on a CPU in seconds. `large`: the
    decoder a little wider and deeper with more heads, as the 3.3 B checkpoints are beside the others.
    """
    from tokenizers import Tokenizer, processors
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
        PreTrainedTokenizerFast,
        T5Config,
    )

    from .tiny import byte_level_bpe

    if kind not in ("melody", "small"):
        raise ValueError(f"kind must be 'melody' or 'small', not {kind!r}")
    # A copy of the shared BPE that, like T5's tokenizer, ends every text with </s> (so "" is one token).
    bpe = Tokenizer.from_str(byte_level_bpe(512, ("<pad>", "</s>", "<unk>")).to_str())
    bpe.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", bpe.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_config.decoder_start_token_id = tokenizer.pad_token_id
    # frame_rate = 32000 / prod(upsampling_ratios) = 50; num_quantizers = 1000 * bandwidth // (50 * log2(64)) = 4.
    audio_config = EncodecConfig(
        sampling_rate=SAMPLE_RATE,
        upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[1.25],
        codebook_size=TINY_CODEBOOK_SIZE,
        hidden_size=16,
        num_filters=4,
        num_lstm_layers=2,
        num_residual_layers=1,
        normalize=False,
        use_causal_conv=False,
        use_conv_shortcut=False,  # as facebook/encodec_32khz
    )
    decoder_kwargs: dict[str, Any] = dict(
        vocab_size=TINY_CODEBOOK_SIZE,
        pad_token_id=TINY_CODEBOOK_SIZE,
        bos_token_id=TINY_CODEBOOK_SIZE,
        num_codebooks=8 if stereo else 4,
        audio_channels=2 if stereo else 1,
        hidden_size=48 if large else 32,
        ffn_dim=96 if large else 64,
        num_hidden_layers=3 if large else 2,
        num_attention_heads=3 if large else 2,
        max_position_embeddings=2048,
        dropout=0.0,
        # Larger than the hub's 0.02: at that scale a tiny random decoder barely hears its conditioning,
        # and the tests must see the melody and the caption steer the codes.
        initializer_factor=0.3,
    )
    model: Any
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "melody":
            model = MusicgenMelodyForConditionalGeneration(
                MusicgenMelodyConfig(
                    text_encoder=text_config,
                    audio_encoder=audio_config,
                    decoder=MusicgenMelodyDecoderConfig(**decoder_kwargs),
                )
            )
        else:
            model = MusicgenForConditionalGeneration(
                MusicgenConfig(
                    text_encoder=text_config,
                    audio_encoder=audio_config,
                    decoder=MusicgenDecoderConfig(**decoder_kwargs),
                )
            )
        # Random init leaves EnCodec's codebooks at zero: every code would decode to the same sound.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
    # The same generation defaults as the hub checkpoints (sampling, top-k 250, CFG 3, 30 s context).
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = TINY_CODEBOOK_SIZE
    gen.do_sample, gen.top_k, gen.guidance_scale, gen.max_length = True, 250, 3.0, MAX_FRAMES
    return model.eval(), tokenizer
