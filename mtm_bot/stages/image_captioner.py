"""Describe a picture in one sentence (BLIP through transformers), so that a track can be made from it.

    image = read_image(path, max_bytes=..., max_pixels=...)   # typed ImageErrors, before any model work
    captioner = ImageCaptioner.load(profile, model_id, device)
    captioner.describe(image)                                  # "a snowy village at night with lights"

Reading a picture is safe before queueing a job and imports no model library (docs/ARCHITECTURE.md,
"The image captioner").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from ..core.audio import megabytes
from ..core.errors import ImageFileTooLarge, MTMError, NotAnImage, TooManyPixels, TruncatedImage

if TYPE_CHECKING:
    import torch

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif"}
DESCRIPTION_MAX_CHARS = 200  # one sentence; BLIP writes about 10 words

# BLIP's own captioning settings (beam search, 3 beams, at least 5 and at most 20 words' worth of tokens).
NUM_BEAMS = 3
MIN_NEW_TOKENS = 5
MAX_NEW_TOKENS = 30


def read_image(path: str | Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an uploaded picture into RGB (a GIF's first frame; transparency on white), or raise an
    ImageError whose message is one sentence for the user."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageFileTooLarge(
            f"The picture is {megabytes(size)}; the limit is {megabytes(max_bytes)}. "
            "Please upload a smaller PNG, JPEG, WebP or GIF."
        )
    with warnings.catch_warnings():
        # Our pixel limit is stricter than Pillow's bomb warning; Pillow's own error still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise _too_many_pixels(None, max_pixels) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise NotAnImage("That file is not a picture I can read; please attach a PNG, JPEG, WebP or GIF.") from None
    with image:
        width, height = image.size  # from the header: nothing is decoded yet
        if width * height > max_pixels:
            raise _too_many_pixels((width, height), max_pixels)
        try:
            image.seek(0)  # a GIF's (or animated WebP's) first frame
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError):
            raise TruncatedImage("The picture is damaged or cut short (truncated); please upload it again.") from None
        return _to_rgb(image)


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> TooManyPixels:
    declared = f" ({size[0]} × {size[1]} pixels)" if size else ""
    return TooManyPixels(
        f"The picture is too large{declared}; the limit is {max_pixels / 1e6:g} megapixels. "
        "Please upload a smaller picture."
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ImageCaptioner:
    """A resident BLIP captioning model: one picture in, one sentence out."""

    def __init__(self, model, image_processor, tokenizer, device: torch.device) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(
        cls, profile: str, model_id: str, device: torch.device, dtype: torch.dtype | None = None
    ) -> ImageCaptioner:
        """The model for `profile` on `device`, loaded in float32 and cast to `dtype` (default: half
        precision on CUDA)."""
        from .runtime import cast_for_inference, from_hub, model_dtype

        if profile == "tiny":
            model, image_processor, tokenizer = build_tiny_blip()
        else:
            import torch
            from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil

            image_processor = from_hub(model_id, lambda: BlipImageProcessorPil.from_pretrained(model_id))
            tokenizer = from_hub(model_id, lambda: AutoTokenizer.from_pretrained(model_id))
            model = from_hub(
                model_id, lambda: BlipForConditionalGeneration.from_pretrained(model_id, dtype=torch.float32)
            )
        model = cast_for_inference(model.to(device), dtype or model_dtype(device))
        return cls(model, image_processor, tokenizer, device)

    def describe(self, image: Image.Image) -> str:
        """One sentence about the picture (at most DESCRIPTION_MAX_CHARS characters)."""
        import torch

        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                pixel_values=pixels,
                num_beams=NUM_BEAMS,
                min_new_tokens=MIN_NEW_TOKENS,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
            )
        text = " ".join(self.tokenizer.decode(ids[0], skip_special_tokens=True).split())
        if len(text) > DESCRIPTION_MAX_CHARS:
            text = text[:DESCRIPTION_MAX_CHARS].rsplit(" ", 1)[0]
        if not text:  # a broken checkpoint, not the user's picture: fail the job rather than guess
            raise MTMError("The image captioner returned no description; the server's admins have to check it.")
        return text


# --- The tiny profile: BLIP's architecture at toy width, random weights, built offline -----------------

TINY_IMAGE_SIZE = 64
TINY_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")  # BERT's, plus BLIP's [DEC]


def build_tiny_blip(seed: int = 0):
    """A small BlipForConditionalGeneration (2-layer ViT on 64 px, 2-layer text decoder), its image
    processor and a small byte-level tokenizer, with BLIP's special tokens where the model expects them."""
    import torch
    from tokenizers import Tokenizer
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        PreTrainedTokenizerFast,
    )

    from .tiny import byte_level_bpe

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(byte_level_bpe(512, TINY_SPECIAL_TOKENS).to_str()),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 16,
            # BLIP's vision default (1e-10) would make every picture look the same to the decoder.
            "initializer_range": 0.5,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "initializer_range": 0.5,
            "bos_token_id": ids("[DEC]"),
            "sep_token_id": ids("[SEP]"),
            "pad_token_id": ids("[PAD]"),
            "eos_token_id": ids("[SEP]"),
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return model, image_processor, tokenizer
