"""Thumbnails of indexed images: read from the input shard the prepare stage listed for the id (never from a path a
request names), decoded with encode's bound on pixels, cached."""

from __future__ import annotations

import functools
import io

THUMB_SIDE = 256  # px, the longer side
CACHED = 2048  # thumbnails kept (~15 kB each)


class ThumbnailError(ValueError):
    """The image is in the index but cannot be shown (its shard changed, it does not decode)."""


@functools.lru_cache(maxsize=CACHED)
def thumbnail(file: str, image_id: str, max_pixels: int) -> bytes:
    """JPEG bytes of image `image_id` of shard `file`, at most THUMB_SIDE px a side."""
    from PIL import Image

    from newsclip.workers.images import ImageDecodeError, decode_image, quiet_pillow
    from newsclip.workers.shard_rows import rows_by_id

    try:
        data = rows_by_id(file, "image_id", [image_id], ["image"]).column("image")[0].as_py()
        with quiet_pillow():
            image = decode_image(data, max_pixels, THUMB_SIDE, alpha="white").convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
    except (OSError, ValueError, ImageDecodeError) as e:
        raise ThumbnailError(f"image {image_id}: {e}") from None
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()
