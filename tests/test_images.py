"""Image decoding: every odd image becomes clip's own pixels (its preprocess of `Image.open`) or a clear reason."""

import io
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from newsclip.workers.encoders import clip_pixels, decode_images
from newsclip.workers.image_check import image_error
from newsclip.workers.images import CLIP_MODES, ImageDecodeError, decode_image

clip = pytest.importorskip("clip")
from clip.clip import _transform  # noqa: E402


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _photo(seed: int, size=(90, 70)) -> np.ndarray:
    """Noise over colour gradients (uint8 RGB): resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def odd_images() -> dict[str, bytes]:
    """A file of every mode where decoding can part from clip's preprocess: a disc on a transparent background whose
    hidden colour is white (RGBA, LA), palettes without and with a transparency key or alpha table, 1-bit, CMYK and
    grey JPEGs, an EXIF-rotated JPEG, an animated GIF with a transparent index."""
    rgb = _photo(1)
    y, x = np.mgrid[0:70, 0:90]
    disc = (x - 45) ** 2 + (y - 35) ** 2 < 28 ** 2
    rgba = np.dstack([np.where(disc[..., None], rgb, 255), np.where(disc, 255, 0)]).astype(np.uint8)
    la = np.dstack([np.where(disc, rgb[..., 0], 255), np.where(disc, 200, 0)]).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": clip does not, nor does newsclip
    frames = [Image.fromarray(_photo(seed)).quantize(32) for seed in (2, 3)]
    cmyk = np.dstack([rgb, _photo(5)[..., 0]])  # with black ink: CMYK to RGB is not linear then
    return {
        "rgba": _bytes(Image.fromarray(rgba, "RGBA"), "PNG"),
        "la": _bytes(Image.fromarray(la, "LA"), "PNG"),
        "palette": _bytes(palette, "PNG"),
        "palette-key": _bytes(keyed, "PNG", transparency=3),
        "palette-alpha": _bytes(palette, "PNG", transparency=bytes(range(0, 256, 16))),  # Pillow warns on these
        "1-bit": _bytes(Image.fromarray(rgb[..., 0] > 128), "PNG"),
        "cmyk-jpeg": _bytes(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=90),
        "grey-jpeg": _bytes(Image.fromarray(rgb[..., 1]), "JPEG", quality=90),
        "exif-rotated-jpeg": _bytes(Image.fromarray(rgb), "JPEG", exif=exif.tobytes()),
        "animated-gif": _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0,
                               transparency=5),
    }


def _ours(datas: list[bytes], resolution: int) -> torch.Tensor:
    """What the encode stage computes: the CPU task's uint8 pixels, normalised as the model actor does."""
    table = pa.table({"image": pa.array(datas, pa.binary())})
    decoded = decode_images(table, resolution, max_pixels=10**6, draft=False, jpeg_to_actor=False)
    assert decoded.column("error").null_count == len(datas), decoded.column("error").to_pylist()
    pixels = np.stack([np.frombuffer(p, np.uint8).reshape(3, resolution, resolution)
                       for p in decoded.column("pixels").to_pylist()])
    return _transform(resolution).transforms[-1](torch.from_numpy(pixels).float().div(255))


@pytest.mark.parametrize("resolution", [48, 224])  # down- and upscaled
def test_pixels_are_clips_own_preprocess_of_image_open(resolution):
    images = odd_images()
    preprocess = _transform(resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and Pillow's warnings about such files stay off the console
        ours = _ours(list(images.values()), resolution)
        assert all(image_error(data, 10**6) is None for data in images.values())  # prepare's check passes them
    for (name, data), tensor in zip(images.items(), ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip's own preprocess lets Pillow warn
            theirs = preprocess(Image.open(io.BytesIO(data)))
        assert torch.equal(tensor, theirs), name


def test_16_bit_grey_is_clips_preprocess_of_its_8_bit_image():
    # the one deliberate difference: clip's convert("RGB") clips 16-bit values at 255, so the image turns white
    values = _photo(4)[..., 0].astype(np.uint16) * 257 + np.arange(70)[:, None].astype(np.uint16)
    sixteen = _bytes(Image.fromarray(values), "PNG")
    eight = _bytes(Image.fromarray((values >> 8).astype(np.uint8)), "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    preprocess = _transform(48)
    assert torch.equal(_ours([sixteen], 48)[0], preprocess(Image.open(io.BytesIO(eight))))
    assert preprocess(Image.open(io.BytesIO(sixteen))).std() < preprocess(Image.open(io.BytesIO(eight))).std() / 4


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"),
                                      ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "PNG"),
                                      ("RGB", "WEBP"), ("F", "TIFF"), ("YCbCr", "TIFF")])
def test_every_mode_goes_through_clips_steps(mode, fmt):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((10, 20), 40000, np.uint16))
    decoded = decode_image(_bytes(image, fmt))
    assert decoded.mode in CLIP_MODES and decoded.size == (20, 10)
    assert clip_pixels(decoded, 16).shape == (3, 16, 16)


def test_transparent_pixels_as_clip_resizes_them_or_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert tuple(clip_pixels(decode_image(_bytes(image, "PNG")), 4)[:, 0, 0]) == (0, 0, 0)  # premultiplied: black
    assert decode_image(_bytes(image, "PNG"), alpha="white").getpixel((0, 0)) == (255, 255, 255)
    palette = image.convert("P")
    palette.info["transparency"] = 0
    assert decode_image(_bytes(palette, "PNG"), alpha="white").getpixel((0, 0)) == (255, 255, 255)
    opaque = _bytes(Image.new("P", (4, 4)), "PNG")  # nothing to composite: the pixels of "drop"
    assert decode_image(opaque, alpha="white").tobytes() == decode_image(opaque).tobytes()


def test_16_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert decode_image(_bytes(image, "PNG")).getpixel((0, 0)) == 128


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(data).convert("RGB").getpixel((0, 0))
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
