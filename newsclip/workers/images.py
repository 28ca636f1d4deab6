"""Bounded, forgiving image decoding: every image becomes one that clip's preprocess takes, or a reason why not."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

# Modes that go to clip's preprocess as they are: it resizes first and converts to RGB last, and the order shows
# (RGBA and LA are resized premultiplied, so fully transparent pixels turn black; "1" and "P" are resized with
# NEAREST; CMYK converts after the resize). Every one of them resizes and converts (a test checks). 16-bit grey is
# scaled to 8 bits (see `_to_8_bit`); any other mode (F, LAB, HSV: rare in news) is converted to RGB first.
CLIP_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason recorded in rejects/."""


@contextlib.contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings about files it handles anyway off the console: a palette image whose transparency is a
    table of alpha values (clip-art) warned on every conversion, once per image of a fine-tune."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        yield


def open_image(data: bytes | None, max_pixels: int = 40_000_000) -> Image.Image:
    """Read an image's header only (format, mode, size), refusing anything larger than `max_pixels`."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    with _reasons():
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the bound of {max_pixels}")
        return image


def decode_image(data: bytes | None, max_pixels: int = 40_000_000, draft_size: int | None = None,
                 alpha: str = "drop") -> Image.Image:
    """Decode encoded image bytes, refusing anything larger than `max_pixels`, to an image that clip's preprocess
    takes exactly as it takes `Image.open(file)`: in the file's own mode (the first frame of an animation; no EXIF
    rotation, as clip), so that the pixels are clip's. Callers that want RGB convert it.

    One deliberate exception: 16-bit grey, which clip's `convert("RGB")` clips to white, is scaled to 8 bits.
    `draft_size`: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers a square of this
    side, which skips most of the decoding work before a downscale to that size.
    `alpha`: "drop" leaves a transparent image to clip's preprocess; "white" composites it onto white (RGB), as a
    viewer shows it."""
    image = open_image(data, max_pixels)
    with _reasons():
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.seek(0)  # animated images: the first frame
        image.load()
        transparent = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if alpha == "white" and transparent:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if image.mode.startswith("I"):
            return _to_8_bit(image)
        return image if image.mode in CLIP_MODES else image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I from older Pillows) as 8-bit grey: the high byte, as libpng's 16-to-8 strip."""
    import numpy as np

    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


@contextlib.contextmanager
def _reasons() -> Iterator[None]:
    """PIL's many ways of failing on bad bytes, as an ImageDecodeError with the reason for rejects/."""
    try:
        with quiet_pillow():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:  # its message holds the address of a BytesIO: noise in rejects/
        raise ImageDecodeError("not a decodable image: no known image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"not a decodable image: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt files
        raise ImageDecodeError(f"corrupt image: {e}") from None
