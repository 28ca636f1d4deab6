"""What the fine-tune's decode tasks run: pairs -> uint8 pixels and tokens, with the encode stage's decoding.

Runs in CPU Ray tasks (no polars, no faiss; `feed.py` plans them): the bytes are read straight from their shards and
decoded with clip's resize and crop by `newsclip.workers.encoders`, so training sees exactly the pixels the encode
stage produces; the train loop normalises them on its device as ImageEncoder does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from newsclip.retrieval.backbone_values import PreprocessSpec, TokenizerSpec
from newsclip.workers.encoders import decode_images, read_images, tokenize_texts


def decode_pairs(batch: pa.Table, resolution: int, context_length: int, max_pixels: int,
                 alpha: str = "drop", preprocess: PreprocessSpec | None = None,
                 tokenizer: TokenizerSpec | None = None) -> dict[str, np.ndarray]:
    """(query_text, image_id, file) rows -> {pixels uint8 (n, 3, h, w), tokens int32 (n, context)}, with clip's
    preprocess and tokenizer, or an open_clip model's (`preprocess`, `tokenizer`: what the encode stage uses).

    A pair whose image no longer decodes is left out (prepare checked every image: it cannot happen unless a shard
    changed since)."""
    files = batch.column("file").to_pylist()
    image_ids = batch.column("image_id").to_pylist()
    by_file: dict[str, list[str]] = {}
    for file, image_id in zip(files, image_ids):
        ids = by_file.setdefault(file, [])
        if image_id not in ids:
            ids.append(image_id)
    units = pa.table({"file": list(by_file), "ids": list(by_file.values())})
    read = read_images(units)
    decoded = decode_images(read, resolution, max_pixels, draft=False, jpeg_to_actor=False, alpha=alpha,
                            preprocess=preprocess)
    pixels = dict(zip(read.column("image_id").to_pylist(), decoded.column("pixels").to_pylist()))
    keep = [i for i, image_id in enumerate(image_ids) if pixels.get(image_id) is not None]
    h, w = preprocess.size if preprocess is not None else (resolution, resolution)
    stack = np.zeros((len(keep), 3, h, w), np.uint8)
    for row, i in enumerate(keep):
        stack[row] = np.frombuffer(pixels[image_ids[i]], np.uint8).reshape(3, h, w)
    texts = [str(t) for t in batch.column("query_text").to_pylist()]
    kept = pa.table({"hash": [str(i) for i in keep], "query_text": [texts[i] for i in keep]})
    tokens = tokenize_texts(kept, context_length, tokenizer).column("tokens")
    flat = tokens.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(keep) else np.zeros(0, np.int32)
    return {"pixels": stack, "tokens": flat.astype(np.int32).reshape(len(keep), context_length)}
