"""What a prepare worker runs: hash the images of some row groups of a shard, and decode those not checked before."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from newsclip.runtime.embedding_store import content_key
from newsclip.workers.images import ImageDecodeError, decode_image

# A JPEG decoded at the DCT scale that covers 64 px still reads every byte of it: a truncated or corrupt file
# fails there as it fails at full size (checked for truncations all along baseline and progressive files), at
# ~1/8 of the work. Other formats are decoded whole.
CHECK_SIZE = 64

RESULT_SCHEMA = pa.schema([("image_id", pa.string()), ("image_hash", pa.string()), ("error", pa.string()),
                           ("checked", pa.bool_())])


def image_error(data: bytes | None, max_pixels: int) -> str | None:
    """Why an image cannot be encoded (encode's reject reason), or None when it decodes."""
    try:
        decode_image(data, max_pixels, draft_size=CHECK_SIZE)
    except ImageDecodeError as e:
        return str(e)
    return None


def check_images(file: str, row_groups: list[int], known: pa.Table, max_pixels: int) -> pa.Table:
    """(image_id, image_hash, error, checked) for each row of some row groups of one shard, in file order.

    `known`: (image_hash, error) of images checked in an earlier run; their result is reused, and only the other
    hashes are decoded (once each; `checked` marks the rows decoded here)."""
    table = pq.ParquetFile(file).read_row_groups(row_groups, columns=["image_id", "image"])
    datas = table.column("image").to_pylist()
    hashes = pa.array([content_key(data or b"") for data in datas], pa.string())
    position = pc.index_in(hashes, value_set=known.column("image_hash"))
    errors = known.column("error").combine_chunks().take(position).to_pylist()
    seen = position.is_valid().to_pylist()
    checked = [False] * len(datas)
    here: dict[str, str | None] = {}  # a hash twice in this task is decoded once
    for i, (data, digest) in enumerate(zip(datas, hashes.to_pylist())):
        if seen[i]:
            continue
        if digest not in here:
            here[digest] = image_error(data, max_pixels)
            checked[i] = True
        errors[i] = here[digest]
    return pa.table([table.column("image_id").cast(pa.string()), hashes, pa.array(errors, pa.string()),
                     pa.array(checked, pa.bool_())], schema=RESULT_SCHEMA)
