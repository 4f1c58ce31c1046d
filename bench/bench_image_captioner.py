"""Benchmark: what the image captioner adds to a /compose request and to a worker's memory.

    python -m bench.bench_image_captioner --profile tiny --device cpu
    python -m bench.bench_image_captioner --profile full-size --device cpu     # BLIP-base, random weights

Prints one JSON object: the cost of one picture (decoding a 1024 x 768 JPEG with the bot's checks,
then the description: BLIP's preprocessing, ViT, beam search with 3 beams) as the median of
--repeats runs after a warm-up, and the memory the model adds (its parameters in the dtype it runs
in, and the process's resident memory before and after loading it). `full-size` is
Salesforce/blip-image-captioning-base's architecture with random weights and a synthetic word-level
vocabulary of BLIP's size; random weights rarely stop early, so beam search runs to its 30-token
bound (a worst case; real captions are about 10 words).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.memory import resident_mib
from mtm_bot.stages.image_captioner import ImageCaptioner, build_tiny_blip, read_image
from mtm_bot.stages.runtime import cast_for_inference, model_dtype, resolve_device

LIMIT_BYTES = 25 * 1024 * 1024
LIMIT_PIXELS = 40_000_000
BLIP_BASE_VOCAB = 30524  # bert-base-uncased's 30522 + [DEC] and one more, as the checkpoint's config
BLIP_BASE_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522}


def blip_base_random(device: torch.device) -> ImageCaptioner:
    """BLIP-base captioning's architecture (ViT-B/16 at 384 px, BERT-base decoder), random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(BLIP_BASE_VOCAB)}
    for token, i in BLIP_BASE_IDS.items():
        del vocab[f"w{i}"]
        vocab[token] = i
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    config = BlipConfig(text_config={"vocab_size": BLIP_BASE_VOCAB}, vision_config={"image_size": 384})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    model = cast_for_inference(model.to(device), model_dtype(device))
    return ImageCaptioner(model, BlipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "full-size"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    import transformers.models.blip.modeling_blip  # noqa: F401  (a worker has it imported already)

    before = resident_mib()
    if args.profile == "tiny":
        model, image_processor, tokenizer = build_tiny_blip()
        captioner = ImageCaptioner(
            cast_for_inference(model.to(device), model_dtype(device)), image_processor, tokenizer, device
        )
    else:
        captioner = blip_base_random(device)
    after_load = resident_mib()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.jpg"
        pixels = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)

        def request() -> tuple[float, float, str]:
            t0 = time.perf_counter()
            image = read_image(path, LIMIT_BYTES, LIMIT_PIXELS)
            t1 = time.perf_counter()
            text = captioner.describe(image)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return t1 - t0, time.perf_counter() - t1, text

        request()  # warm-up
        runs = [request() for _ in range(args.repeats)]

    params = sum(p.numel() * p.element_size() for p in captioner.model.parameters())
    result = {
        "profile": args.profile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(captioner.model.parameters()).dtype).removeprefix("torch."),
        "parameters_m": round(sum(p.numel() for p in captioner.model.parameters()) / 1e6, 1),
        "parameter_mib": round(params / 2**20, 1),
        "rss_added_by_load_mib": round(after_load - before, 1),
        "read_image_s": round(statistics.median(r[0] for r in runs), 4),
        "describe_s": round(statistics.median(r[1] for r in runs), 3),
        "per_request_s": round(statistics.median(r[0] + r[1] for r in runs), 3),
        "description_words": len(runs[-1][2].split()),
    }
    if device.type == "cuda":
        result["peak_vram_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
