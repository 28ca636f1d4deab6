"""Backbone registry and loader: the nine OpenAI CLIP names, local checkpoint files and the trained demo-tiny."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from newsclip.runtime.store import file_sha256

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    import torch
    from PIL import Image


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the pipeline needs to know about a backbone before loading it."""

    name: str
    family: str  # "resnet" | "vit"
    input_resolution: int  # the square image side the preprocess produces
    embed_dim: int  # the size of the joint embedding
    image_gflops: float  # the cost of encoding one image: sets the default batch size and GPU share


# Shapes from openai/CLIP's model card and the configs its checkpoints build to (build_model: text_projection
# columns = embed_dim, attnpool grid * 32 or patch * grid = input_resolution). GFLOPs per image from open_clip's
# docs/model_profile.csv (image_gflops of the same architectures).
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("RN50", "resnet", 224, 1024, 12.22),
        BackboneSpec("RN101", "resnet", 224, 512, 19.54),
        BackboneSpec("RN50x4", "resnet", 288, 640, 42.56),
        BackboneSpec("RN50x16", "resnet", 384, 768, 149.39),
        BackboneSpec("RN50x64", "resnet", 448, 1024, 529.11),
        BackboneSpec("ViT-B/32", "vit", 224, 512, 8.82),
        BackboneSpec("ViT-B/16", "vit", 224, 512, 35.13),
        BackboneSpec("ViT-L/14", "vit", 224, 768, 162.03),
        BackboneSpec("ViT-L/14@336px", "vit", 336, 768, 381.92),
        # trained by newsclip.demo.model on the synthetic scenes: ModifiedResNet tower, 64 px, embed 64
        BackboneSpec("demo-tiny", "resnet", 64, 64, 0.05),
    )
}
DEMO_TINY = "demo-tiny"
CONTEXT_LENGTH = 77  # the text context of every registry backbone (clip.tokenize's default)
OPENAI_NAMES = tuple(name for name in BACKBONES if name != DEMO_TINY)

# The clip package's download URLs (clip.clip._MODELS), copied so that resolving a name needs no torch import.
# The second-to-last path segment is the file's sha256; a test checks these against the installed package.
_OPENAI_URLS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def cache_dir() -> Path:
    """Where newsclip keeps its own model files (demo-tiny.pt): `$NEWSCLIP_CACHE` or `~/.cache/newsclip`."""
    env = os.environ.get("NEWSCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "newsclip"


def default_clip_root() -> Path:
    """The clip package's own default download folder."""
    return Path(os.path.expanduser("~/.cache/clip"))


def openai_weights_file(name: str, download_root: str | Path | None = None) -> Path:
    """Where `clip.load(name, download_root=...)` keeps the weights of an OpenAI backbone (it may not exist)."""
    url = _OPENAI_URLS[name]
    return Path(download_root or default_clip_root()).expanduser() / os.path.basename(url)


def _expected_sha256(name: str) -> str:
    return _OPENAI_URLS[name].split("/")[-2]


def resolve_weights(name_or_path: str, download_root: str | Path | None = None) -> Path:
    """The weights file that `load_backbone(name_or_path)` would read; FileNotFoundError with advice if absent."""
    if name_or_path in _OPENAI_URLS:
        path = openai_weights_file(name_or_path, download_root)
        if not path.is_file():
            where = Path(download_root or default_clip_root()).expanduser()
            raise FileNotFoundError(
                f"weights for backbone {name_or_path!r} not found: expected the file {path.name!r} in {where} "
                f"(newsclip never downloads at load time). Fetch it on a machine with network access "
                f"(python -c \"from newsclip.retrieval.backbones import prefetch; "
                f"prefetch({name_or_path!r}, '{where}')\" "
                f"or from {_OPENAI_URLS[name_or_path]}), bake it into the container image, or point "
                f"download_root at a folder that holds it.")
        return path
    if name_or_path == DEMO_TINY:
        path = cache_dir() / "demo-tiny.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"the demo-tiny backbone is not trained yet: no file {path}. Run `newsclip demo-model` to train it "
                f"(about 4 minutes on 2 CPU cores), or set NEWSCLIP_CACHE to a folder that holds demo-tiny.pt.")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"unknown backbone {name_or_path!r}: not one of {sorted(BACKBONES)} and no checkpoint file at "
            f"{path.resolve()}")
    if not path.is_file():
        raise FileNotFoundError(f"backbone path {path.resolve()} is not a file (expected a CLIP checkpoint)")
    return path


def missing_weights(names: Iterable[str], download_root: str | Path | None = None) -> list[str]:
    """What `load_backbone` would not find for `names`, one message per file (the OpenAI names' together): what is
    missing, where it was looked for, and how to get it. Files are found, not read (the loader checks them)."""
    messages, openai = [], []
    for name in names:
        try:
            resolve_weights(name, download_root)
        except FileNotFoundError as e:
            if name in _OPENAI_URLS:
                openai.append(name)
            else:
                messages.append(str(e))
    if openai:
        where = Path(download_root or default_clip_root()).expanduser()
        files = ", ".join(openai_weights_file(name, where).name for name in openai)
        messages.insert(0, f"weights for {len(openai)} OpenAI backbone{'s' if len(openai) > 1 else ''} not found in "
                        f"{where} (encode.download_root): {files}. newsclip never downloads at job time: fetch them "
                        f"on a machine with network access (python -c \"from newsclip.retrieval.backbones import "
                        f"prefetch; [prefetch(n, '{where}') for n in {openai!r}]\"), bake them into the container "
                        f"image (cluster/bake.py), or point encode.download_root at a folder that holds them.")
    return messages


def prefetch(name: str, download_root: str | Path | None = None) -> Path:
    """Download an OpenAI backbone's weights with the clip package (needs network; for image builds and laptops)."""
    import clip.clip

    if name not in _OPENAI_URLS:
        raise ValueError(f"{name!r} is not an OpenAI backbone: one of {list(_OPENAI_URLS)}")
    root = Path(download_root or default_clip_root()).expanduser()
    return Path(clip.clip._download(_OPENAI_URLS[name], str(root)))


# (resolved path, size, mtime_ns) -> sha256 hex, so repeated loads in one process hash a file once
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def checkpoint_id(name_or_path: str, download_root: str | Path | None = None) -> str:
    """First 16 hex digits of the sha256 of the weights file `load_backbone` would read: a cache key.

    For an OpenAI name this is the checksum published in its URL, so it needs no file (the loader refuses any
    file whose checksum differs); for demo-tiny and paths the file is hashed (once per process and file state).
    """
    if name_or_path in _OPENAI_URLS:
        return _expected_sha256(name_or_path)[:16]
    return _file_sha256(resolve_weights(name_or_path, download_root))[:16]


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip with code/ and constants.pkl; torch.save writes a zip with data.pkl only
    # (or, in the legacy format, a bare pickle stream).
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _load_state_dict(path: Path, mmap: bool = False) -> dict:
    import pickle

    import torch

    try:
        # weights_only: a checkpoint from elsewhere never gets to run code while it is unpickled
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        # torch's own message advises loading with weights_only=False: never for a file that is not a checkpoint
        reason = str(exc).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        raise ValueError(f"cannot read {path} as a CLIP checkpoint (a TorchScript archive or a state dict of "
                         f"tensors): {' '.join(reason.split()) or type(exc).__name__}; is it a whole checkpoint? "
                         "Copy it again, or name another file in backbones") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # training checkpoints often wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    missing = [k for k in ("text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight")
               if k not in obj]
    if missing or not any(k.startswith("visual.") for k in obj):
        raise ValueError(f"{path} is not an OpenAI-CLIP state dict: missing {missing or ['visual.*']}")
    return obj


# keys of OpenAI's state dicts that only size the model: build_model reads and drops them, load_state_dict refuses them
_BUILD_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _checkpoint_state(path: Path, mmap: bool = False) -> dict:
    """The tensors of a checkpoint file, as it holds them: a TorchScript archive's (all OpenAI files) or a state
    dict's (memory-mapped with `mmap`: only the tensors read are paged in)."""
    if _is_torchscript(path):
        import torch

        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return _load_state_dict(path, mmap)


def checkpoint_shapes(path: Path) -> tuple[int, int, int]:
    """(image side, text context length, embedding size) read off a CLIP checkpoint's weights the way
    `clip.model.build_model` infers them, without building the model (a state dict is memory-mapped, not read)."""
    state = _checkpoint_state(path, mmap=True)
    context, embed = state["positional_embedding"].shape[0], state["text_projection"].shape[1]
    if "visual.proj" in state:  # ViT: patch size x grid
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return state["visual.conv1.weight"].shape[-1] * grid, context, embed
    grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    return grid * 32, context, embed  # ModifiedResNet: the attention pool sees the image at 1/32


def input_sizes(name_or_path: str, download_root: str | Path | None = None) -> tuple[int, int]:
    """(image side, text context length) of a backbone's inputs: from the registry, or read off a checkpoint's
    weights (`checkpoint_shapes`)."""
    if name_or_path in BACKBONES:
        return BACKBONES[name_or_path].input_resolution, CONTEXT_LENGTH
    return checkpoint_shapes(resolve_weights(name_or_path, download_root))[:2]


def load_backbone(
    name_or_path: str, device: str = "cpu", download_root: str | Path | None = None
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Load a CLIP backbone and its image preprocess, never touching the network.

    The model is in eval mode. On CPU it is float32 (as `clip.load` gives) and holds the checkpoint's tensors bit
    for bit (fp16 and bf16 values are exact in fp32); elsewhere it has clip's mixed fp16 weights, as `clip.load`
    gives on a GPU.
    """
    path = resolve_weights(name_or_path, download_root)
    if name_or_path in _OPENAI_URLS:
        # clip.load(name) would re-download a file with a wrong checksum; check here and fail clearly instead
        actual = _file_sha256(path)
        if actual != _expected_sha256(name_or_path):
            raise ValueError(
                f"{path} is not the published {name_or_path} checkpoint (sha256 {actual[:16]}..., expected "
                f"{_expected_sha256(name_or_path)[:16]}...): a partial or corrupted download? Delete it and fetch it "
                f"again on a machine with network access.")
    from clip.clip import _transform
    from clip.model import build_model, convert_weights

    # clip.load's non-JIT path (it rebuilds a plain nn.Module from any file's weights; it cannot read plain state
    # dicts in openai-clip 1.0.1, openai/CLIP#396), but build_model loads the weights into an fp16 model: an
    # fp32 checkpoint (a fine-tune: most of its updates are under fp16's resolution) would come back rounded. So
    # the model it builds gives only the architecture, and the file's tensors are loaded again into its fp32 copy.
    state = _checkpoint_state(path)
    model = build_model(dict(state)).float()
    model.load_state_dict({k: v for k, v in state.items() if k not in _BUILD_ONLY_KEYS})
    model = model.to(device)
    if str(device) != "cpu":
        convert_weights(model)
    return model.eval(), _transform(model.visual.input_resolution)
