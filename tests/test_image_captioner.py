"""The image captioner: pictures in every accepted format are read safely; bad ones get a clear sentence."""

import io

import pytest
import torch
from PIL import Image

from mtm_bot.core.errors import ImageFileTooLarge, NotAnImage, TooManyPixels, TruncatedImage
from mtm_bot.stages.image_captioner import ImageCaptioner, read_image
from tests.pictures import bad_pictures, picture_bytes, png_bomb

LIMIT_BYTES = 25 * 1024 * 1024
LIMIT_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def captioner() -> ImageCaptioner:
    return ImageCaptioner.load("tiny", "Salesforce/blip-image-captioning-base", torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_every_accepted_format_is_read_as_rgb(fmt, tmp_path):
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(picture_bytes(fmt, (90, 60)))
    image = read_image(path, LIMIT_BYTES, LIMIT_PIXELS)
    assert image.mode == "RGB" and image.size == (90, 60)


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "blink.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, blue = read_image(path, LIMIT_BYTES, LIMIT_PIXELS).getpixel((20, 20))
    assert red > 200 and blue < 50


def test_transparency_is_laid_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(path)
    assert read_image(path, LIMIT_BYTES, LIMIT_PIXELS).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("name", ["not_an_image", "decompression_bomb", "truncated"])
def test_bad_pictures_raise_their_own_error_with_a_sentence_for_the_user(name, tmp_path):
    path, error, fragment = bad_pictures(tmp_path)[name]
    with pytest.raises(error) as raised:
        read_image(path, LIMIT_BYTES, LIMIT_PIXELS)
    assert fragment in str(raised.value) and str(raised.value).endswith(".")


def test_a_bomb_is_refused_from_its_header_and_pillows_own_limit_is_ours_too(tmp_path):
    small = tmp_path / "small_bomb.png"
    small.write_bytes(png_bomb(7_000, 7_000))  # 49 MP: over our 40 MP, under Pillow's own check
    with pytest.raises(TooManyPixels, match="7000 × 7000"):
        read_image(small, LIMIT_BYTES, LIMIT_PIXELS)
    huge = tmp_path / "huge_bomb.png"
    huge.write_bytes(png_bomb(20_000, 20_000))  # 400 MP: Pillow itself refuses it while opening
    with pytest.raises(TooManyPixels, match="40 megapixels"):
        read_image(huge, LIMIT_BYTES, LIMIT_PIXELS)


def test_a_truncated_png_and_a_file_over_the_limit(tmp_path):
    png = picture_bytes("PNG", (200, 200))
    cut = tmp_path / "cut.png"
    cut.write_bytes(png[: len(png) // 2])
    with pytest.raises(TruncatedImage):
        read_image(cut, LIMIT_BYTES, LIMIT_PIXELS)
    whole = tmp_path / "whole.png"
    whole.write_bytes(png)
    with pytest.raises(ImageFileTooLarge, match="the limit is"):
        read_image(whole, len(png) - 1, LIMIT_PIXELS)


def test_audio_is_not_a_picture(tmp_path):
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, [0.0] * 1600, 16000, format="WAV")
    path = tmp_path / "song.png"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(NotAnImage):
        read_image(path, LIMIT_BYTES, LIMIT_PIXELS)


def test_describe_gives_one_line_that_depends_on_the_picture(captioner, tmp_path):
    descriptions = []
    for seed in (1, 2):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(picture_bytes("PNG", (120, 90), seed=seed))
        descriptions.append(captioner.describe(read_image(path, LIMIT_BYTES, LIMIT_PIXELS)))
    assert all(d and "\n" not in d and len(d) <= 200 for d in descriptions)
    assert descriptions[0] != descriptions[1]  # the picture reaches the decoder (random weights, same model)
    again = read_image(tmp_path / "1.png", LIMIT_BYTES, LIMIT_PIXELS)
    assert captioner.describe(again) == descriptions[0]  # deterministic (beam search)
