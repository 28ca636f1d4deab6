"""The encode workers: CPU tasks + model actors equal clip's own preprocess and model call bit for bit, precision is
what it says (and names the store), a GPU actor without a GPU fails, and the worker code imports no polars/faiss."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from newsclip.config import EncodeConfig
from newsclip.encoding import store_label
from newsclip.workers.encoders import (
    ImageEncoder,
    TextEncoder,
    apply_precision,
    decode_images,
    measured_precision,
    tokenize_texts,
)
from newsclip.workers.images import ImageDecodeError, decode_image

clip = pytest.importorskip("clip")
from test_backbones import tiny_clip  # noqa: E402

BATCH = 4
MAX_PIXELS = 400_000


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size=(200, 133)) -> Image.Image:
    """Noise over colour gradients: a photo's spread of frequencies, so resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def _images() -> dict[str, bytes]:
    png = io.BytesIO()
    Image.new("RGBA", (90, 120), (10, 200, 30, 128)).save(png, "PNG")
    photos = {f"photo-{i}": _jpeg(_photo(i)) for i in range(9)}
    return {**photos, "grey": _jpeg(_photo(20).convert("L")), "cmyk": _jpeg(_photo(21).convert("CMYK")),
            "png-alpha": png.getvalue(), "progressive": _jpeg(_photo(22), progressive=True),
            "truncated": photos["photo-0"][:400], "truncated-late": photos["photo-1"][:5000], "empty": b"",
            "html": b"<html>not found</html>",
            "too-large": _jpeg(Image.new("RGB", (800, 600)))}


@pytest.fixture(scope="module", params=["resnet", "vit"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / f"{request.param}.pt"
    torch.save(tiny_clip(request.param, vocab=49408).state_dict(), path)
    return str(path)


def _cfg(**settings) -> EncodeConfig:
    return EncodeConfig(batch_size=BATCH, max_image_pixels=MAX_PIXELS, **settings).for_backbone("a checkpoint")


def _decoded(datas: list[bytes], resolution: int, **settings) -> pa.Table:
    table = pa.table({"image_id": [str(i) for i in range(len(datas))], "image": pa.array(datas, pa.binary())})
    options = {"max_pixels": MAX_PIXELS, "draft": False, "jpeg_to_actor": False, **settings}
    return decode_images(table, resolution=resolution, **options)


def _todays_path(model, preprocess, datas: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """The encoder before the split: PIL decode and clip's preprocess per image, then the model in batches of
    exactly BATCH rows (the last zero-padded), L2-normalised."""
    errors, tensors = [], []
    for data in datas:
        try:
            tensors.append(preprocess(decode_image(data, MAX_PIXELS)))
            errors.append(None)
        except ImageDecodeError as e:
            errors.append(str(e))
    pixels, out = torch.stack(tensors), []
    threads = torch.get_num_threads()
    torch.set_num_threads(_cfg().torch_threads)  # the encoder's thread count: another count sums in another order
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels), BATCH):
                chunk = pixels[start:start + BATCH]
                padded = torch.cat([chunk, chunk.new_zeros((BATCH - len(chunk), *chunk.shape[1:]))])
                features = model.encode_image(padded)[:len(chunk)].float()
                out.append((features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy())
    finally:
        torch.set_num_threads(threads)
    vectors = np.zeros((len(datas), out[0].shape[1]), np.float32)
    vectors[[i for i, e in enumerate(errors) if e is None]] = np.concatenate(out)
    return vectors, errors


def _embeddings(table: pa.Table) -> np.ndarray:
    return table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(table), -1)


def test_split_images_equal_todays_path_bit_for_bit(checkpoint):
    from newsclip.retrieval.backbones import load_backbone

    model, preprocess = load_backbone(checkpoint)
    datas = list(_images().values())
    expected, reasons = _todays_path(model, preprocess, datas)
    encoder = ImageEncoder(checkpoint, _cfg())
    resolution = model.visual.input_resolution
    decoded = _decoded(datas, resolution)
    assert decoded.column("pixels").type == pa.large_binary() and decoded.column("jpeg").null_count == len(datas)
    # the actor sees its rows in slices of any size (Ray's bundles): the result is the same
    parts = [encoder(decoded.slice(start, 5)) for start in range(0, len(datas), 5)]
    result = pa.concat_tables(parts)
    assert np.array_equal(_embeddings(result), expected)
    assert result.column("error").to_pylist() == reasons  # the same rejects, with the same reasons
    assert sum(r is not None for r in reasons) == 5  # truncated twice, empty, html, too-large
    assert result.column("hash").to_pylist() == [_hash(d) for d in datas]


def _hash(data: bytes) -> str:
    from newsclip.runtime.embedding_store import content_key

    return content_key(data)


def test_split_texts_equal_a_direct_call_bit_for_bit(checkpoint):
    from newsclip.retrieval.backbones import input_sizes, load_backbone

    model, _ = load_backbone(checkpoint)
    texts = [f"A {c} {s} in the top left, seen from afar on a long day of news" for c in ("red", "blue", "green")
             for s in ("circle", "star")] + ["x" * 500]
    _, context = input_sizes(checkpoint)
    assert context == model.context_length == 16
    tokens = tokenize_texts(pa.table({"hash": [str(i) for i in range(len(texts))], "query_text": texts}), context)
    result = TextEncoder(checkpoint, _cfg())(tokens)
    with torch.inference_mode():
        direct = clip.tokenize(texts, context_length=context, truncate=True)
        chunks = [torch.cat([c, c.new_zeros((BATCH - len(c), context))]) for c in direct.split(BATCH)]
        features = torch.cat([model.encode_text(c)[:len(d)] for c, d in zip(chunks, direct.split(BATCH))]).float()
    expected = (features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
    assert np.array_equal(_embeddings(result), expected)
    assert result.column("error").null_count == len(texts)


def test_input_sizes_of_a_checkpoint_are_what_the_model_builds_to(checkpoint):
    from newsclip.retrieval.backbones import input_sizes, load_backbone

    model, _ = load_backbone(checkpoint)
    assert input_sizes(checkpoint) == (model.visual.input_resolution, model.context_length)
    assert input_sizes("ViT-L/14@336px") == (336, 77)


def test_clip_half_recipe_crashes_and_fp16_is_clips_mixed_precision():
    # the encoder of old called model.half(): clip's LayerNorm computes in fp32 and fails on fp16 weights, on the
    # GPU ("expected scalar type Float but found Half") as on this CPU ("mixed dtype")
    tokens = clip.tokenize(["a red circle"], context_length=16)
    with pytest.raises(RuntimeError, match="dtype|Half|Float"):
        tiny_clip("vit", vocab=49408).half().encode_text(tokens)
    with pytest.raises(RuntimeError, match="LayerNorm weights"):
        measured_precision(tiny_clip("vit").half(), autocast=False)

    reference = tiny_clip("vit", vocab=49408)
    model = apply_precision(tiny_clip("vit", vocab=49408), "fp16", "cpu")
    assert measured_precision(model, autocast=False) == "fp16"
    assert model.visual.conv1.weight.dtype == torch.float16 and model.ln_final.weight.dtype == torch.float32
    pixels = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        for fp16, fp32 in ((model.encode_text(tokens), reference.encode_text(tokens)),
                           (model.encode_image(pixels.half()), reference.encode_image(pixels))):
            assert fp16.dtype == torch.float16
            assert torch.nn.functional.cosine_similarity(fp16.float(), fp32).min() > 0.99
    assert measured_precision(apply_precision(model, "fp32", "cpu"), autocast=False) == "fp32"
    assert measured_precision(apply_precision(model, "bf16", "cpu"), autocast=True) == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_the_actor_runs_in_the_precision_it_reports(checkpoint, precision):
    encoder = TextEncoder(checkpoint, _cfg(precision=precision))
    assert encoder.precision == precision
    tokens = tokenize_texts(pa.table({"hash": ["a", "b"], "query_text": ["a red circle", "a blue star"]}), 16)
    vectors = _embeddings(encoder(tokens))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    fp32 = _embeddings(TextEncoder(checkpoint, _cfg(precision="fp32"))(tokens))
    assert (precision == "fp32") == np.array_equal(vectors, fp32)  # the other precisions compute other numbers
    assert np.min(np.sum(vectors * fp32, axis=1)) > 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_fp32_model_computes_with_the_checkpoints_own_weights(checkpoint, precision):
    # the store's fp32 label once named weights rounded through fp16 by clip's build_model
    encoder = TextEncoder(checkpoint, _cfg(precision=precision))
    weights = encoder.model.state_dict()
    for key, tensor in torch.load(checkpoint, weights_only=True).items():
        assert weights[key].dtype == tensor.dtype and torch.equal(weights[key], tensor), key


def test_an_actor_that_would_run_in_another_precision_fails(checkpoint, monkeypatch):
    import newsclip.workers.encoders as encoders

    monkeypatch.setattr(encoders, "apply_precision", lambda model, precision, device: model.float())
    with pytest.raises(RuntimeError, match="asked for fp16 on cpu, the model runs in fp32 on cpu"):
        TextEncoder(checkpoint, _cfg(precision="fp16"))


def test_store_label_names_precision_and_preprocess():
    assert store_label(_cfg()) == "fp32-v2"
    assert store_label(_cfg(precision="bf16", jpeg_draft=True, alpha="white")) == "bf16-draft-white-v2"
    gpu = EncodeConfig(num_gpus_per_actor=1, decode="auto").for_backbone("RN50")
    assert (gpu.device, gpu.precision, gpu.decode, store_label(gpu)) == ("cuda", "fp16", "gpu", "fp16-nvjpeg-v2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_actor_asked_for_a_gpu_without_one_fails_clearly(checkpoint):
    cfg = EncodeConfig(batch_size=BATCH, num_gpus_per_actor=1).for_backbone("RN50")
    with pytest.raises(RuntimeError, match="asked to run on a GPU .* torch sees none .* will not fall back"):
        ImageEncoder(checkpoint, cfg)


def test_actor_side_jpeg_decoding_runs_on_cpu_too(checkpoint):
    """`decode: gpu` with the actor on a CPU: the same code as nvjpeg's path, through torchvision's CPU decoder."""
    from newsclip.retrieval.backbones import load_backbone

    model, preprocess = load_backbone(checkpoint)
    images = _images()
    datas = list(images.values())
    resolution = model.visual.input_resolution
    decoded = _decoded(datas, resolution, jpeg_to_actor=True)
    travels = dict(zip(images, decoded.column("jpeg").is_valid().to_pylist()))
    assert {name for name, as_jpeg in travels.items() if as_jpeg} == {
        *(f"photo-{i}" for i in range(9)), "grey", "progressive", "truncated-late"}  # CMYK, PNG: on the CPU
    result = ImageEncoder(checkpoint, _cfg(decode="gpu"))(decoded)
    expected, reasons = _todays_path(model, preprocess, datas)
    errors = result.column("error").to_pylist()
    for name, got, want, error, reason in zip(images, _embeddings(result), expected, errors, reasons):
        if name == "truncated-late":  # libjpeg may pad a truncated file with grey where PIL refuses it
            assert (error is None) != (got == 0).all()
            continue
        assert (error is None) == (reason is None), name
        if reason is None:
            assert float(got @ want) > 0.98, name  # torch's antialiased bicubic, not PIL's: close, not equal


def test_draft_decoding_moves_pixels_little():
    datas = [_jpeg(_photo(i, (800, 533))) for i in range(3)]
    exact = _decoded(datas, 64, max_pixels=10**6).column("pixels").to_pylist()
    draft = _decoded(datas, 64, max_pixels=10**6, draft=True).column("pixels").to_pylist()
    differences = [np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8)).mean()
                   for a, b in zip(exact, draft)]
    assert all(0 < d < 12 for d in differences), differences  # other pixels, the same picture


def test_encode_workers_import_neither_polars_nor_faiss():
    code = ("import sys, newsclip.encoding, newsclip.stages.encode, newsclip.workers.encoders; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'polars', 'faiss'}))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp16", "fp32", "bf16"])
def test_cuda_actor_matches_the_cpu_reference(checkpoint, precision):
    gpu = EncodeConfig(batch_size=BATCH, num_gpus_per_actor=1, precision=precision,
                       max_image_pixels=MAX_PIXELS).for_backbone("RN50")
    datas = [data for name, data in _images().items() if name.startswith("photo")]
    images = ImageEncoder(checkpoint, gpu)
    decoded = _decoded(datas, images.resolution)
    reference = _embeddings(ImageEncoder(checkpoint, _cfg())(decoded))
    assert images.precision == precision
    assert np.min(np.sum(_embeddings(images(decoded)) * reference, axis=1)) > 0.99
    tokens = tokenize_texts(pa.table({"hash": ["a", "b"], "query_text": ["a red circle", "a blue star"]}), 16)
    texts = _embeddings(TextEncoder(checkpoint, gpu)(tokens))
    assert np.min(np.sum(texts * _embeddings(TextEncoder(checkpoint, _cfg())(tokens)), axis=1)) > 0.99


@pytest.mark.cuda
def test_nvjpeg_decoding_matches_the_cpu_path(checkpoint):
    gpu = EncodeConfig(batch_size=BATCH, num_gpus_per_actor=1, decode="gpu",
                       max_image_pixels=MAX_PIXELS).for_backbone("RN50")
    datas = [data for name, data in _images().items() if name.startswith("photo") or name == "grey"]
    encoder = ImageEncoder(checkpoint, gpu)
    result = encoder(_decoded(datas, encoder.resolution, jpeg_to_actor=True))
    reference = _embeddings(ImageEncoder(checkpoint, _cfg())(_decoded(datas, encoder.resolution)))
    assert result.column("error").null_count == len(datas)
    assert np.min(np.sum(_embeddings(result) * reference, axis=1)) > 0.98


@pytest.mark.parametrize("cpus_per_actor", [0, 1])
def test_decode_tasks_stay_out_of_the_model_actors(ray_local, checkpoint, tmp_path, capsys, cpus_per_actor):
    """Ray fuses a task map into the actor map after it when their remote args agree: the decoding would then run
    on the GPU worker again, one image at a time. The optimized plan keeps them apart."""
    import pyarrow.parquet as pq

    from newsclip import config
    from newsclip.encoding import IMAGES, model_rows

    pq.write_table(pa.table({"image_id": ["a", "b"], "image": list(_images().values())[:2]}), tmp_path / "s.parquet")
    cfg = config.load(None, [f"backbones=[{checkpoint}]", f"encode.num_cpus_per_actor={cpus_per_actor}"])
    todo = pa.table({"image_id": ["a", "b"], "file": [str(tmp_path / "s.parquet")] * 2, "hash": ["1", "2"]})
    model_rows(cfg, cfg.encode.for_backbone(checkpoint), checkpoint, IMAGES, todo).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(read_and_decode_images)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(ImageEncoder)]" in optimized


def test_a_sample_pool_holds_only_the_images_of_the_queries_that_reach_evaluation(tmp_path):
    import pyarrow.parquet as pq

    from newsclip import config
    from newsclip.encoding import IMAGES, wanted_rows

    def write(table: pa.Table, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)

    candidates = pa.table({"image_id": ["i1", "i2", "i3"], "image_hash": ["h1", "h2", "h3"],
                           "file": ["f"] * 3, "candidate": [True, True, False]})
    write(candidates, tmp_path / "prepared" / "candidates.parquet")
    # a1 (image i2) was sampled but translate left it out: only a0's image is ranked in sample mode
    write(pa.table({"article_id": ["a0"], "image_id": ["i1"], "query_text": ["t"]}),
          tmp_path / "translated" / "part-00000.parquet")
    sample = config.load(None, [f"output_dir={tmp_path}"])
    assert wanted_rows(sample, IMAGES)[0].column("image_id").to_pylist() == ["i1"]
    every = config.load(None, [f"output_dir={tmp_path}", "eval.candidates=all"])
    wanted, todo = wanted_rows(every, IMAGES, stored=pa.array(["h1"]))
    assert wanted.column("image_id").to_pylist() == ["i1", "i2"] and todo.column("image_id").to_pylist() == ["i2"]
