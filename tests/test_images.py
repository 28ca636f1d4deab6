"""Image decoding: every odd image becomes RGB or a clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from newsclip.workers.images import ImageDecodeError, decode_image


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"),
                                      ("RGBA", "PNG"), ("I;16", "PNG"), ("1", "PNG"), ("RGB", "WEBP")])
def test_modes_become_rgb(mode, fmt):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((10, 20), 40000, np.uint16))
    decoded = decode_image(_bytes(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparent_pixels_as_clip_converts_them_or_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(_bytes(image, "PNG")).getpixel((0, 0)) == (255, 0, 0)  # clip's convert("RGB")
    assert decode_image(_bytes(image, "PNG"), alpha="white").getpixel((0, 0)) == (255, 255, 255)
    palette = image.convert("P")
    palette.info["transparency"] = 0
    assert decode_image(_bytes(palette, "PNG"), alpha="white").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert decode_image(_bytes(image, "PNG")).getpixel((0, 0))[0] == 128


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(data).getpixel((0, 0))
    assert r > 200 and b < 50


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"), (None, "empty"), (b"<html><body>404</body></html>", "not a decodable image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a decodable image"),
])
def test_not_images(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg():
    data = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    data = _bytes(Image.new("L", (4000, 4000)), "PNG")  # tiny file, 16M pixels
    with pytest.raises(ImageDecodeError, match="exceeds the bound"):
        decode_image(data, max_pixels=1_000_000)
