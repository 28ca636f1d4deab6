"""Bounded, forgiving image decoding: every image becomes RGB or a reason why it could not."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason recorded in rejects/."""


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
    """Decode encoded image bytes to an RGB image, refusing anything larger than `max_pixels`.

    `draft_size`: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers a square of this
    side, which skips most of the decoding work before a downscale to that size.
    `alpha`: "drop" converts a transparent image with `convert("RGB")`, as clip's preprocess does (the colours
    under transparent pixels show); "white" composites it onto white, as a viewer shows it."""
    image = open_image(data, max_pixels)
    with _reasons():
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.seek(0)  # animated images: the first frame
        image.load()
    transparent = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if alpha == "white" and transparent:
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit: scale to 8-bit rather than clip
    return image.convert("RGB")


@contextlib.contextmanager
def _reasons() -> Iterator[None]:
    """PIL's many ways of failing on bad bytes, as an ImageDecodeError with the reason for rejects/."""
    try:
        with warnings.catch_warnings():
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
