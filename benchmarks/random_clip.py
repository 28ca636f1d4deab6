"""Any of the nine OpenAI CLIP architectures with random weights, saved as the fp16 state dict a released checkpoint
holds: speed does not depend on the weights, so benchmarks need no download."""

from __future__ import annotations

from pathlib import Path

# clip.model.CLIP arguments: (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers), as clip.model.build_model
# infers them from the published checkpoints (and as open_clip's model configs list them).
ARCHITECTURES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}


def random_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """Save `name`'s architecture with random weights (fp16 like the released files) as a state dict at `path`;
    `demo-tiny` is newsclip's own small CLIP (4.6M parameters), for checks that must take seconds on a CPU."""
    import torch
    from clip.model import CLIP, convert_weights

    if name not in ARCHITECTURES and name != "demo-tiny":
        raise SystemExit(f"--random-weights: {name!r} is not one of {', '.join(ARCHITECTURES)}, demo-tiny")
    torch.manual_seed(seed)
    if name == "demo-tiny":
        from newsclip.demo.model import build_demo_clip

        model = build_demo_clip()
    else:
        model = CLIP(*ARCHITECTURES[name])
    convert_weights(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def is_open_clip_arch(name: str) -> bool:
    """An open_clip architecture name (`ViT-B-16-SigLIP2`), alone or with a tag (`ViT-B-32/laion2b_s34b_b79k`)."""
    import open_clip

    return name.split("/", 1)[0] in open_clip.list_models()


def random_open_clip(name: str, folder: Path, seed: int = 0):
    """An open_clip architecture with random weights saved to `folder` as safetensors, resolved as a job resolves
    `{open_clip: ARCH, pretrained: FILE}` (with its published tag's preprocess; a Hub tokenizer that is not cached
    here is left out: the text side then takes random tokens)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from newsclip.retrieval.backbone_values import BackboneEntry, PreprocessSettings
    from newsclip.retrieval.open_clip_models import resolve_open_clip
    from newsclip.retrieval.registry import weights_id

    arch = name.split("/", 1)[0]
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained_text=False, pretrained_image=False)
    path = folder / f"{arch}-random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = open_clip.get_pretrained_cfg(arch, tags[0]) if tags else {}
    preprocess = PreprocessSettings(**{k: tag[k] for k in ("mean", "std", "resize_mode", "interpolation") if k in tag})
    entry = BackboneEntry(open_clip=arch, pretrained=str(path), preprocess=preprocess)
    return resolve_open_clip(name, entry, None, None, "random", entry.text, weights_id, tokenizer_required=False)
