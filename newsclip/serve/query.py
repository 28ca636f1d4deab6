"""Queries encoded in this process by the encode stage's own code: the backbone's tokeniser and bounded image
decoding (clip's, or the open_clip model's own) as its CPU tasks run them, then the model actor's class. A text
already in the index (its content hash is a stored row's) gets that row's stored embedding, bit for bit; any other
text or image is encoded in batches of a fixed shape (QUERY_BATCH rows, padded), so a query's embedding depends on its
content alone."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pyarrow as pa

from newsclip.config import JobConfig
from newsclip.runtime.console import warn
from newsclip.runtime.embedding_store import content_key, content_keys
from newsclip.serve.index import BackboneIndex

# rows per encoder call: a padded batch of 1, 2, 4, 8 takes demo-tiny's text tower ~1.2-2, 1.5-2.7, 2.5-3.4, 4.3 ms
# on one core, and a query waits for the whole batch; at 50 queries a second most batches hold 1 to 3 (at 1M rows:
# p50 43-108 ms with 2 against 106-207 ms with 8, the same minutes)
QUERY_BATCH = 2


class QueryError(ValueError):
    """A query that cannot be encoded (an image that does not decode): the client's mistake, a 4xx."""


class QueryEncoders:
    """The job's text and image encoders, each backbone resolved as the job resolves it (its mapping entry, its local
    weights), loaded once per backbone and side, on first use."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self._models: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def _model(self, backbone: str, side):
        with self._lock:
            key = (backbone, side.name)
            if key not in self._models:
                self._models[key] = side.encoder(self.cfg.resolved(backbone), self._settings(backbone))
            return self._models[key]

    def _settings(self, backbone: str):
        """The encode stage's settings for `backbone`, in batches of QUERY_BATCH. A job that encodes on GPUs is
        searched from a process without one (a laptop, a CPU replica) with the same weights on the CPU, in fp32, as
        the stage encodes on CPUs: a query is stored nowhere, so no embedding gets another precision's label."""
        import torch

        enc = replace(self.cfg.encode.for_backbone(backbone), batch_size=QUERY_BATCH)
        if enc.device == "cuda" and not torch.cuda.is_available():
            warn(f"search: {backbone}'s queries are encoded on the CPU in fp32 (the job encodes on GPUs; this process "
                 f"has none)")
            enc = replace(enc, device="cpu", precision="fp32", decode="cpu", num_gpus_per_actor=0)
        return enc

    def texts(self, index: BackboneIndex, texts: list[str]) -> np.ndarray:
        """(len(texts), d) embeddings: a stored text's own row, the others encoded."""
        from newsclip.encoding import TEXTS, prepare_in_memory

        stored = index.texts.hash_rows if index.texts is not None else {}
        rows = [stored.get(content_key(t)) for t in texts]
        out = np.empty((len(texts), index.images.vectors.shape[1]), np.float32)
        new = [i for i, r in enumerate(rows) if r is None]
        for i, r in enumerate(rows):
            if r is not None:
                out[i] = index.texts.vectors[r]
        if new:
            model, fresh = self._model(index.name, TEXTS), [texts[i] for i in new]
            batch = pa.table({"hash": content_keys(fresh), "query_text": pa.array(fresh, pa.string())})
            out[new] = _vectors(model(prepare_in_memory(TEXTS, model.backbone, model.cfg, batch)))
        return out

    def images(self, index: BackboneIndex, images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """(len(images), d) embeddings and each image's decode error (None: fine; its row is then zeros). Decoded
        on the CPU and bounded exactly as in encode (the decompression-bomb bound, the same preprocess)."""
        from newsclip.encoding import IMAGES, prepare_in_memory

        model, batch = self._model(index.name, IMAGES), pa.table({"image": pa.array(images, pa.binary())})
        encoded = model(prepare_in_memory(IMAGES, model.backbone, model.cfg, batch))
        return _vectors(encoded), encoded.column("error").to_pylist()


def _vectors(table: pa.Table) -> np.ndarray:
    from newsclip.runtime.store import vectors_of

    return np.array(vectors_of(table.column("embedding")), np.float32)
