"""What an encode worker runs: CPU tasks that decode images and tokenise texts, and model actors that only encode.

This is the code Ray's GPU workers import, so it imports neither polars nor faiss (a test checks), and torch and
clip only inside the functions that run on a worker.

The split (Ray's batch-inference shape): decoding one news photo costs a CPU process ~8 ms, so an actor that
decoded its own images fed an H200 ~1/40 of what it can take. Here CPU tasks, as many as the cluster has CPUs,
turn image bytes into uint8 pixels (the model's own resize: clip's, or an open_clip model's squash, shortest side or
longest side, with its interpolation) and texts into tokens (clip's tokenizer or the open_clip model's own); the
model actors (a ResolvedBackbone each) copy them to their device, normalise there with the model's mean and std
(uint8 is a quarter of float32's bytes through the object store and over PCIe) and run the model. With
`encode.decode: gpu`, JPEGs travel as their bytes and the actor decodes them with nvjpeg.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from newsclip.retrieval.backbone_values import PreprocessSpec, ResolvedBackbone, TokenizerSpec
from newsclip.retrieval.registry import as_resolved, load_model
from newsclip.runtime.embedding_store import content_key, content_keys
from newsclip.runtime.store import embedding_table, vectors_of
from newsclip.workers.images import ImageDecodeError, decode_image, open_image, quiet_pillow
from newsclip.workers.shard_rows import read_units

if TYPE_CHECKING:
    import torch

    from newsclip.config import EncodeConfig

PIXELS_TYPE = pa.large_binary()  # one row's uint8 CHW pixels; large: a batch of 336 px images passes 2 GB offsets
# rows the decode and tokenise tasks take at a time: ~2 s of decoding news photos, small enough that every CPU of
# a GPU node gets work and the model actors get their first batch early
TASK_ROWS = 256


@functools.lru_cache(maxsize=8)
def _geometry(resolution: int):
    """clip's own resize and crop (the first steps of `clip.clip._transform`): bicubic on the short side, centre."""
    from clip.clip import _transform

    return _transform(resolution).transforms[:3]  # Resize, CenterCrop, convert to RGB


@functools.lru_cache(maxsize=8)
def _open_clip_geometry(preprocess: PreprocessSpec):
    """open_clip's own eval transform for these settings, up to ToTensor: its resize (shortest side and centre crop,
    squash, or longest side and pad), its interpolation, then RGB."""
    from open_clip.transform import image_transform

    transform = image_transform(preprocess.size, is_train=False, mean=preprocess.mean, std=preprocess.std,
                                resize_mode=preprocess.resize_mode, interpolation=preprocess.interpolation,
                                fill_color=preprocess.fill_color)
    return transform.transforms[:-2]  # ToTensor and Normalize run on the model's device


def clip_pixels(image, resolution: int, preprocess: PreprocessSpec | None = None) -> np.ndarray:
    """A decoded image (`decode_image`: in its own mode) as the model's preprocess sees it before ToTensor: clip's
    resize, crop and RGB (in clip's order), or open_clip's for `preprocess`; uint8, channels first (3, h, w)."""
    with quiet_pillow():
        for step in _geometry(resolution) if preprocess is None else _open_clip_geometry(preprocess):
            image = step(image)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def read_images(units: pa.Table) -> pa.Table:
    """(file, ids) units -> the (image_id, image) rows they name, read straight from their shard (only the row
    groups that hold them): the encoded bytes never pass through Ray's object store, only the pixels do."""
    return read_units(units, "image_id", ["image_id", "image"])


def read_and_decode_images(units: pa.Table, **options) -> pa.Table:
    """CPU task: the images of some (file, ids) units, read and decoded (see `decode_images`)."""
    return decode_images(read_images(units), **options)


def decode_images(batch: pa.Table, resolution: int, max_pixels: int, draft: bool, jpeg_to_actor: bool,
                  alpha: str = "drop", preprocess: PreprocessSpec | None = None) -> pa.Table:
    """CPU task: image bytes -> (hash, pixels, jpeg, error). An undecodable image gets its reason, never raises.

    `preprocess`: an open_clip model's resize (None: clip's, to `resolution`). `jpeg_to_actor`: JPEGs that nvjpeg
    can take (RGB or grey) keep their bytes for the actor to decode on its GPU; only their header is read here, for
    the size bound."""
    hashes, pixels, jpegs, errors = [], [], [], []
    for data in batch.column("image").to_pylist():
        hashes.append(content_key(data or b""))
        pixel, jpeg, error = None, None, None
        try:
            if jpeg_to_actor and is_gpu_jpeg(open_image(data, max_pixels)):
                jpeg = data
            else:
                image = decode_image(data, max_pixels, resolution if draft else None, alpha)
                pixel = clip_pixels(image, resolution, preprocess).data
        except ImageDecodeError as e:
            error = str(e)
        pixels.append(pixel)
        jpegs.append(jpeg)
        errors.append(error)
    return pa.table({"hash": pa.array(hashes, pa.string()), "pixels": pa.array(pixels, PIXELS_TYPE),
                     "jpeg": pa.array(jpegs, pa.large_binary()), "error": pa.array(errors, pa.string())})


def is_gpu_jpeg(image) -> bool:
    # nvjpeg decodes baseline and progressive YCbCr/grey JPEGs; CMYK and the rest stay on the CPU path
    return image.format == "JPEG" and image.mode in ("RGB", "L")


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: TokenizerSpec):
    from newsclip.retrieval.open_clip_models import open_clip_tokenizer

    return open_clip_tokenizer(spec)


def tokenize_texts(batch: pa.Table, context_length: int, tokenizer: TokenizerSpec | None = None) -> pa.Table:
    """CPU task: (hash, query_text) -> (hash, tokens): clip's tokeniser cut at the model's context (77 tokens), or
    the open_clip model's own (`tokenizer`: SimpleTokenizer or its Hugging Face tokenizer from a local folder)."""
    texts = [str(t) for t in batch.column("query_text").to_pylist()]
    if tokenizer is None or tokenizer.kind == "clip":
        import clip

        tokens = clip.tokenize(texts, context_length=context_length, truncate=True).numpy().astype(np.int32)
    else:
        tokens = _tokenizer(tokenizer)(texts, context_length=context_length).numpy().astype(np.int32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), context_length)
    return pa.table({"hash": batch.column("hash"), "tokens": column})


def read_and_tokenize_texts(units: pa.Table, context_length: int, tokenizer: TokenizerSpec | None = None) -> pa.Table:
    """CPU task: the query texts of some (file, ids) units, read from their shard, keyed by their content hash and
    tokenised (see `tokenize_texts`): the texts never pass through the driver."""
    texts = read_units(units, "article_id", ["query_text"]).column("query_text")
    return tokenize_texts(pa.table({"hash": content_keys(texts.to_pylist()), "query_text": texts}), context_length,
                          tokenizer)


def apply_precision(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """fp32: `model.float()`. fp16: clip's own mixed precision, exactly what `clip.load` gives on CUDA (conv,
    linear and attention weights fp16, LayerNorms fp32: clip's LayerNorm computes in fp32, so `model.half()`
    crashed on the first batch). bf16: the fp32 model under bf16 autocast (see `_Encoder._encode`)."""
    from clip.model import convert_weights

    model.float()
    if precision == "fp16":
        convert_weights(model)
    return model.to(device).eval()


def apply_open_clip_precision(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """As `apply_precision`, for an open_clip model: fp16 is open_clip's own (its `precision="fp16"`: low-precision
    weights, its fp32 LayerNorms kept; a timm tower cast whole)."""
    import torch
    from open_clip.factory import _set_model_device_and_precision

    model.float()
    is_timm = type(model.visual).__name__ == "TimmModel"  # what open_clip's factory asks of the config
    _set_model_device_and_precision(model, torch.device(device), precision if precision == "fp16" else "fp32",
                                    is_timm)
    return model.eval()


def measured_precision(model: torch.nn.Module, autocast: bool) -> str:
    """The precision a model really computes in, read from its weights (the store's label comes from this)."""
    import torch

    if hasattr(model.visual, "conv1") and hasattr(model, "dtype"):  # clip's: the dtype its inputs are cast to
        dtype = model.visual.conv1.weight.dtype
    else:  # open_clip's towers: their linear layers
        dtype = next(m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer_norms = {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
                   and type(m).__module__.startswith("clip")}
    if layer_norms - {torch.float32}:
        raise RuntimeError(f"LayerNorm weights in {sorted(map(str, layer_norms))}: clip's LayerNorm computes in "
                           f"fp32 and fails on other weights")
    if dtype == torch.float16 and not autocast:
        return "fp16"
    if dtype == torch.float32:
        return "bf16" if autocast else "fp32"
    raise RuntimeError(f"unexpected weight dtype {dtype} (autocast: {autocast})")


def _require_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        import os

        raise RuntimeError(
            f"encode: this actor was asked to run on a GPU (encode.device / encode.num_gpus_per_actor) but torch sees "
            f"none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__} built "
            f"for CUDA {torch.version.cuda}). It will not fall back to the CPU: set encode.num_gpus_per_actor: 0 to "
            f"encode on CPUs, or give the cluster GPU nodes.")


class _Encoder:
    """Loads one backbone once per actor on its device and precision; subclasses encode one side's batches."""

    def __init__(self, backbone: ResolvedBackbone | str, cfg: EncodeConfig):
        import torch

        torch.set_num_threads(cfg.torch_threads)
        self.torch, self.cfg, self.device = torch, cfg, cfg.device
        _require_device(self.device)
        self.backbone = backbone = as_resolved(backbone, cfg.download_root)
        apply = apply_precision if backbone.kind == "clip" else apply_open_clip_precision
        self.model = apply(load_model(backbone), cfg.precision, self.device)
        self.autocast = cfg.precision == "bf16"
        self.precision = measured_precision(self.model, self.autocast)
        runs_on = next(self.model.parameters()).device.type
        if (self.precision, runs_on) != (cfg.precision, self.device):
            raise RuntimeError(f"encode {backbone.name}: asked for {cfg.precision} on {self.device}, the model runs in "
                               f"{self.precision} on {runs_on}: its embeddings would be stored under the wrong label")
        self.dim = backbone.embed_dim
        self.input_dtype = torch.float16 if self.precision == "fp16" else torch.float32

    def _result(self, hashes: pa.Array, vectors: np.ndarray, errors: pa.Array) -> pa.Table:
        # A pyarrow table rather than a dict of numpy arrays: Ray would store a 2-D array as its own tensor
        # extension type, and the output contract is a plain fixed_size_list that any Arrow reader understands.
        table = embedding_table(hashes.to_pylist(), vectors, "hash")
        return table.append_column("error", errors)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pinned and non-blocking on CUDA: the copy overlaps the work already queued on the GPU."""
        if self.device == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _encode(self, encode, inputs: torch.Tensor, prepare=lambda x: x) -> np.ndarray:
        """L2-normalised features, computed in batches of exactly `batch_size` rows (the last one zero-padded).

        A row's embedding then depends on its content alone: torch's CPU kernels gave bitwise-equal results for
        a row wherever it sat in a batch of a fixed size, but not across batch sizes (1e-6 apart). So a row
        encoded tonight in a batch of new rows equals the same row encoded in a full run, and rankings match.
        `prepare` runs on the device (uint8 pixels -> normalised floats)."""
        torch, size, out = self.torch, self.cfg.batch_size, []
        autocast = torch.autocast(self.torch.device(self.device).type, torch.bfloat16, enabled=self.autocast)
        with torch.inference_mode(), autocast:
            for start in range(0, len(inputs), size):
                chunk = inputs[start:start + size]
                n = len(chunk)
                if n < size:
                    chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
                features = encode(prepare(self._to_device(chunk)))[:n].float()
                out.append((features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class ImageEncoder(_Encoder):
    """(hash, pixels | jpeg, error) -> (hash, embedding, error): normalises uint8 pixels on the device, decodes
    JPEG bytes there (nvjpeg on CUDA), and runs the image tower. A row with an error keeps it and a zero vector."""

    def __init__(self, backbone: ResolvedBackbone | str, cfg: EncodeConfig):
        from torchvision.transforms import Normalize

        super().__init__(backbone, cfg)
        self.resolution = self.backbone.image_size[0]
        self.size = self.backbone.image_size  # (height, width)
        # the preprocess's own Normalize (clip's or open_clip's: the same op), on the device
        self.normalize = Normalize(self.backbone.preprocess.mean, self.backbone.preprocess.std)
        # the open_clip resize the decode tasks and nvjpeg follow (None: clip's own)
        self.geometry = self.backbone.preprocess if self.backbone.kind == "open_clip" else None

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        # ToTensor's `float().div(255)` then Normalize: on CPU bit-for-bit what the model's preprocess computes
        return self.normalize(pixels.float().div(255)).to(self.input_dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").combine_chunks()
        images = dict(_pixel_rows(batch.column("pixels"), self.size))  # row -> uint8 (3, h, w)
        jpeg = batch.column("jpeg").combine_chunks()
        if jpeg.null_count < len(jpeg):
            errors = self._decode_jpegs(jpeg, images, errors)
        good = sorted(images)
        vectors = np.zeros((len(batch), self.dim), np.float32)
        if good:
            vectors[good] = self._encode(self.model.encode_image, self._stack([images[i] for i in good]),
                                         self._prepare)
        return self._result(batch.column("hash"), vectors, errors)

    def _stack(self, images: list) -> torch.Tensor:
        """One uint8 batch: on the host (copied to the device chunk by chunk), or on the device when some images
        were decoded there."""
        if all(isinstance(image, np.ndarray) for image in images):
            return self.torch.from_numpy(np.stack(images))
        return self.torch.stack([self.torch.as_tensor(image).to(self.device) for image in images])

    def _decode_jpegs(self, jpeg: pa.Array, images: dict, errors: pa.Array) -> pa.Array:
        """Decode the rows' JPEG bytes on the actor's device; a JPEG nvjpeg refuses falls back to the CPU path, and
        one that fails there too gets its error."""
        rows = np.flatnonzero(jpeg.is_valid().to_numpy(zero_copy_only=False))
        reasons = errors.to_pylist()
        decoded = decode_jpegs([jpeg[i].as_py() for i in rows], self.resolution, self.device, self.geometry)
        for i, image in zip(rows, decoded):
            if image is not None:
                images[i] = image
                continue
            try:
                image = decode_image(jpeg[i].as_py(), self.cfg.max_image_pixels, alpha=self.cfg.alpha)
                images[i] = clip_pixels(image, self.resolution, self.geometry)
            except ImageDecodeError as e:
                reasons[i] = str(e)
        return pa.array(reasons, pa.string())


def decode_jpegs(datas: list[bytes], resolution: int, device: str, preprocess: PreprocessSpec | None = None) -> list:
    """JPEG bytes -> uint8 (3, h, w) tensors on `device` (nvjpeg on CUDA, libjpeg on a CPU), resized there
    (antialiased: torch's, close to PIL's) as the model's preprocess resizes: clip's bicubic short side and centre
    crop, or `preprocess`'s mode and interpolation; None where the decoder refuses."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
        decoded = [_or_none(decode_jpeg, data, mode=ImageReadMode.RGB, device=device) for data in datas]
    return [None if image is None else device_resize(image, preprocess or _clip_geometry(resolution))
            for image in decoded]


def _clip_geometry(resolution: int) -> PreprocessSpec:
    return PreprocessSpec((resolution, resolution), (), (), "shortest", "bicubic")


def device_resize(image: torch.Tensor, preprocess: PreprocessSpec) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image resized on its device as open_clip's eval transform resizes: shortest side
    then centre crop, squash to the size, or longest side then centre crop or pad with the fill colour."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import center_crop, pad, resize

    mode = InterpolationMode.BILINEAR if preprocess.interpolation == "bilinear" else InterpolationMode.BICUBIC
    (h, w), (height, width) = preprocess.size, image.shape[-2:]
    if preprocess.resize_mode == "squash":
        return resize(image, [h, w], mode, antialias=True)
    if preprocess.resize_mode == "shortest":
        if h == w:
            return center_crop(resize(image, [h], mode, antialias=True), [h, w])
        scale = max(h / height, w / width)
    else:  # longest
        scale = min(h / height, w / width)
    image = resize(image, [round(height * scale), round(width * scale)], mode, antialias=True)
    dh, dw = max(h - image.shape[-2], 0), max(w - image.shape[-1], 0)
    if dh or dw:
        image = pad(image, [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2], fill=preprocess.fill_color)
    return center_crop(image, [h, w])


def _or_none(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError:
        return None


def _pixel_rows(column: pa.ChunkedArray, shape: tuple[int, int] | int):
    """(row, uint8 array (3, h, w)) for each row with pixels: views of the Arrow buffer, no copy."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    size, row = 3 * h * w, 0
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        flat = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        for i in np.flatnonzero(chunk.is_valid().to_numpy(zero_copy_only=False)):
            start, end = offsets[i], offsets[i + 1]
            if end - start != size:
                raise ValueError(f"pixels of {end - start} bytes, expected {size} (3 x {h} x {w})")
            yield row + int(i), flat[start:end].reshape(3, h, w)
        row += len(chunk)


class TextEncoder(_Encoder):
    """(hash, tokens) -> (hash, embedding, error): the text tower on large batches of ready tokens."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokens = self.torch.tensor(vectors_of(batch.column("tokens")))  # a copy: Arrow's buffers are read-only
        if tokens.shape[1] != self.backbone.context_length:
            raise ValueError(f"tokens of length {tokens.shape[1]}; this text tower takes "
                             f"{self.backbone.context_length}")
        if self.backbone.kind == "open_clip":
            tokens = tokens.long()  # what open_clip's tokenizers give (Hugging Face towers build position ids off it)
        vectors = self._encode(self.model.encode_text, tokens)
        return self._result(batch.column("hash"), vectors, pa.nulls(len(batch), pa.string()))
