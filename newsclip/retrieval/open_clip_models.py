"""open_clip backbones from local files only: a name or job entry resolved to weights, tokenizer and preprocess, and
the model built from them with the Hugging Face Hub offline."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from newsclip.retrieval.backbone_values import (
    BackboneEntry,
    PreprocessSpec,
    ResolvedBackbone,
    TokenizerSpec,
)

# open_clip's preferred weight files in a Hub repo or folder (pretrained.py's HF_WEIGHTS_NAME and its safetensors
# alternatives), in the order it tries them
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# the files that make a folder a Hugging Face tokenizer (either one)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class MissingFiles(FileNotFoundError):
    """Files a backbone needs that are not on this machine; `messages` says what, where and how to fetch each."""

    def __init__(self, messages: list[str]):
        super().__init__("\n".join(messages))
        self.messages = messages


def is_open_clip_name(name: str) -> bool:
    """`ARCH/TAG` with ARCH one of open_clip's architectures (imports open_clip)."""
    arch, sep, tag = name.partition("/")
    if not sep or not tag:
        return False
    import open_clip

    return arch in open_clip.list_models()


def hf_cache_dir(hf_cache: str | None) -> Path:
    """The Hugging Face Hub cache searched for tags' weights and tokenizers: `encode.hf_cache`, else the Hub's own
    (`HF_HUB_CACHE`, `HF_HOME`/hub, ~/.cache/huggingface/hub)."""
    if hf_cache:
        return Path(hf_cache).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_hub_cache(repo: str, filenames: tuple[str, ...], cache: Path) -> Path | None:
    """The first of `filenames` that the Hub cache holds for `repo` (read offline: no request is made)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_folder(repo: str, needs: tuple[str, ...], cache: Path) -> Path | None:
    found = _from_hub_cache(repo, needs, cache)
    return found.parent if found else None


def _fetch(repo: str, cache: Path, files: tuple[str, ...] = ()) -> str:
    include = " ".join(f"--include '{f}'" for f in files)
    return f"HF_HUB_CACHE={cache} hf download {repo} {include}".replace("  ", " ").strip()


def _weights(arch: str, pretrained: str, download_root: str | None, cache: Path) -> tuple[Path, dict | None]:
    """(weights file, the tag's open_clip config or None for a file) of `pretrained`."""
    from open_clip.factory import _find_checkpoint_in_dir
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        found = _find_checkpoint_in_dir(path)
        if not found:
            raise MissingFiles([f"open_clip {arch}: no weights file (*.safetensors, *.bin, *.pth) in the folder "
                                f"{path.resolve()}: name the file itself as pretrained"])
        return Path(found), None
    tag = get_pretrained_cfg(arch, pretrained)
    if not tag:
        if "/" in pretrained or Path(pretrained).suffix:
            raise MissingFiles([f"open_clip {arch}: no weights file at {path.resolve()} (pretrained: {pretrained})"])
        raise MissingFiles([f"open_clip {arch}: {pretrained!r} is not one of its pretrained tags "
                            f"({', '.join(list_pretrained_tags_by_model(arch)) or 'none'}) and no such file"])
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])  # open_clip's form: "org/repo/" or "org/repo/file"
        names = (filename,) if filename else HUB_WEIGHT_FILES
        if filename.endswith(".bin"):
            names = (filename.removesuffix(".bin") + ".safetensors", filename)
        found = _from_hub_cache(repo, names, cache)
        if found:
            return found, tag
        raise MissingFiles([f"weights of open_clip {arch}/{pretrained} not found: expected {' or '.join(names)} of "
                            f"the Hub repo {repo} in the Hugging Face cache {cache} (encode.hf_cache; newsclip never "
                            f"downloads at job time). Fetch it on a machine with network access: "
                            f"`{_fetch(repo, cache, names)}`, then copy that cache folder here, or name the "
                            f"file itself: {{open_clip: {arch}, pretrained: FILE}}"])
    url = tag.get("url", "")
    root = Path(download_root or "~/.cache/clip").expanduser()
    found = root / os.path.basename(url)
    if found.is_file():
        return found, tag
    raise MissingFiles([f"weights of open_clip {arch}/{pretrained} not found: expected the file {found.name} in "
                        f"{root} (encode.download_root). Fetch it on a machine with network access: `curl -L -o "
                        f"{found} {url}`"])


def _preprocess(arch: str, model_cfg: dict, tag: dict | None, given) -> PreprocessSpec:
    """open_clip's eval preprocess: its defaults, then the tag's settings (for a file: the settings that every
    published tag of the architecture shares), then what the job gives."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
    from open_clip.transform import PreprocessCfg

    keys = ("mean", "std", "resize_mode", "interpolation", "fill_color")
    settings = {k: getattr(PreprocessCfg(), k) for k in keys}
    if tag is None:
        tags = [get_pretrained_cfg(arch, t) for t in list_pretrained_tags_by_model(arch)]
        shared = {k: tags[0][k] for k in keys if tags and k in tags[0]
                  and all(tuple(np_tuple(t.get(k))) == tuple(np_tuple(tags[0][k])) for t in tags)}
        settings.update(shared)
    else:
        settings.update({k: tag[k] for k in keys if k in tag})
    settings.update(model_cfg.get("preprocess_cfg", {}))
    if given is not None:
        settings.update({k: getattr(given, k) for k in keys if getattr(given, k) is not None})
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return PreprocessSpec(size=size, mean=tuple(map(float, settings["mean"])), std=tuple(map(float, settings["std"])),
                          resize_mode=settings["resize_mode"], interpolation=settings["interpolation"],
                          fill_color=int(settings["fill_color"]))


def np_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _local_hf_folder(what: str, repo: str, given: str | None, needs: tuple[str, ...], cache: Path, arch: str,
                     key: str) -> Path:
    """A Hugging Face folder (tokenizer or text-tower config): the job's, `repo` itself if it is a folder, else the
    Hub cache's snapshot."""
    for folder in (given, repo):
        if folder and Path(folder).expanduser().is_dir():
            folder = Path(folder).expanduser()
            if any((folder / f).is_file() for f in needs):
                return folder
            if folder == Path(given or "").expanduser():
                raise MissingFiles([f"{what} of open_clip {arch}: the folder {folder} holds none of {list(needs)}"])
    found = _hub_folder(repo, needs, cache)
    if found:
        return found
    raise MissingFiles([f"{what} of open_clip {arch} not found: open_clip reads it from the Hub repo {repo}, expected "
                        f"in the Hugging Face cache {cache} (encode.hf_cache) or a local folder named by {key}. "
                        f"Fetch it on a machine with network access: `{_fetch(repo, cache)}` (or `hf download {repo} "
                        f"--local-dir DIR` and {key}: DIR)"])


def estimate_gflops(model_cfg: dict) -> float:
    """The cost of one image, from the vision config: a ViT's 2 x (12 T w^2 + 2 T^2 w) per layer (T tokens, w width;
    it gives open_clip's profile for ViT-B/32, 8.8), a timm ViT's size from its name, else a mid-sized model's 50."""
    vision = model_cfg.get("vision_cfg", {})
    size = vision.get("image_size", 224)
    side = size if isinstance(size, int) else max(size)
    width, layers, patch = vision.get("width"), vision.get("layers"), vision.get("patch_size")
    timm = vision.get("timm_model_name", "")
    match = re.search(r"(tiny|small|base|large|huge|giant|so400m|so150m)_patch(\d+)", timm)
    if match and not (width and isinstance(layers, int)):
        width, layers = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24),
                         "huge": (1280, 32), "giant": (1536, 40), "so400m": (1152, 27),
                         "so150m": (880, 18)}[match.group(1)]
        patch = int(match.group(2))
    if width and isinstance(layers, int) and patch:
        tokens = (side // patch) ** 2 + 1
        return round(2 * layers * (12 * tokens * width ** 2 + 2 * tokens ** 2 * width) / 1e9, 2)
    if "convnext" in timm:  # convnext_base at 224: 15.4 GMACs, growing with the pixels
        return round(2 * 15.4 * (side / 224) ** 2, 2)
    return 50.0


def _tokenizer(arch: str, model_cfg: dict, entry: BackboneEntry | None, cache: Path) -> TokenizerSpec:
    text_cfg = model_cfg.get("text_cfg", {})
    context = int(text_cfg.get("context_length", 77))
    kwargs = json.dumps(text_cfg.get("tokenizer_kwargs", {}), sort_keys=True)
    repo = text_cfg.get("hf_tokenizer_name", "")
    if not repo:
        return TokenizerSpec("simple", context, kwargs_json=kwargs)
    folder = _local_hf_folder("the tokenizer", repo, entry.tokenizer if entry else None, TOKENIZER_FILES, cache,
                              arch, "tokenizer")
    return TokenizerSpec("hf", context, str(folder), text_cfg.get("tokenizer_mode"), kwargs)


def resolve_open_clip(name: str, entry: BackboneEntry | None, download_root: str | None, hf_cache: str | None,
                      slug: str, text: str, file_id, tokenizer_required: bool = True) -> ResolvedBackbone:
    """`ARCH/TAG` or an `{open_clip: ARCH, pretrained: ...}` entry, resolved from local files; MissingFiles names
    every file that is not here. `file_id(path)` gives a weights file's checkpoint id. Without `tokenizer_required`
    (benchmarks of random weights: the image side alone) a Hub tokenizer that is not here is no error, and the value
    has no tokenizer folder."""
    from open_clip.factory import get_model_config

    arch, pretrained = (entry.open_clip, entry.pretrained) if entry else name.split("/", 1)
    model_cfg = get_model_config(arch)
    if model_cfg is None:
        raise MissingFiles([f"{arch!r} is not an open_clip architecture (open_clip.list_models())"])
    cache = hf_cache_dir(hf_cache)
    missing, weights, tag, tokenizer, text_model = [], None, None, None, None
    try:
        weights, tag = _weights(arch, pretrained, download_root, cache)
    except MissingFiles as e:
        missing += e.messages
    try:
        tokenizer = _tokenizer(arch, model_cfg, entry, cache)
    except MissingFiles as e:
        if tokenizer_required:
            missing += e.messages
        tokenizer = TokenizerSpec("hf", int(model_cfg["text_cfg"].get("context_length", 77)))
    hf_model = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_model:
        try:
            text_model = str(_local_hf_folder("the text tower's config", hf_model, entry.text_model if entry else None,
                                              ("config.json",), cache, arch, "text_model"))
        except MissingFiles as e:
            missing += e.messages
    if missing:
        raise MissingFiles(missing)
    preprocess = _preprocess(arch, model_cfg, tag, entry.preprocess if entry else None)
    sigmoid = model_cfg.get("init_logit_bias") is not None
    return ResolvedBackbone(
        name=name, slug=slug, kind="open_clip", weights=str(weights), checkpoint_id=file_id(weights),
        image_size=preprocess.size, context_length=tokenizer.context_length, embed_dim=int(model_cfg["embed_dim"]),
        tokenizer=tokenizer, preprocess=preprocess, image_gflops=estimate_gflops(model_cfg), text=text,
        source=pretrained, download_root=download_root, arch=arch, model_cfg_json=json.dumps(model_cfg),
        text_model=text_model, loss="sigmoid" if sigmoid else "infonce")


@contextlib.contextmanager
def hub_offline():
    """The Hugging Face Hub and transformers offline while a model is built: nothing is fetched, ever."""
    import huggingface_hub.constants as hub

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    before, flag = {k: os.environ.get(k) for k in names}, hub.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(names, "1"))
    hub.HF_HUB_OFFLINE = True  # read once at import: the environment alone would come too late
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = flag
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_open_clip(backbone: ResolvedBackbone):
    """The open_clip model of a resolved backbone, fp32 on the CPU in eval mode, its weights from its local file."""
    import open_clip

    model_cfg = backbone.model_cfg
    text_cfg = dict(model_cfg["text_cfg"])
    if backbone.text_model:  # the tower's config from its local folder; its weights come with the checkpoint
        text_cfg.update(hf_model_name=backbone.text_model, hf_model_pretrained=False)
    if text_cfg.get("hf_tokenizer_name") and backbone.tokenizer.folder:
        text_cfg["hf_tokenizer_name"] = backbone.tokenizer.folder
    if backbone.arch not in open_clip.list_models():  # a worker without the driver's registered configs
        open_clip.factory._MODEL_CONFIGS[backbone.arch] = model_cfg
    with hub_offline():
        model = open_clip.create_model(backbone.arch, pretrained=backbone.weights, text_cfg=text_cfg,
                                       pretrained_text=False, pretrained_image=False)
    return model.float().eval()


def open_clip_tokenizer(spec: TokenizerSpec):
    """open_clip's tokenizer for a spec: SimpleTokenizer, or its HFTokenizer over the local folder."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if spec.kind == "simple":
        return SimpleTokenizer(context_length=spec.context_length, **spec.kwargs)
    with hub_offline():
        return HFTokenizer(spec.folder, context_length=spec.context_length, tokenizer_mode=spec.mode, **spec.kwargs)
