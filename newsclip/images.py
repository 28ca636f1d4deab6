"""Bounded, forgiving image decoding: every image becomes RGB or a reason why it could not."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason recorded in rejects/."""


def decode_image(data: bytes | None, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode encoded image bytes to an RGB image, refusing anything larger than `max_pixels`."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the bound of {max_pixels}")
            image.seek(0)  # animated images: the first frame
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"not a decodable image: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt files
        raise ImageDecodeError(f"corrupt image: {e}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit: scale to 8-bit rather than clip
    return image.convert("RGB")
