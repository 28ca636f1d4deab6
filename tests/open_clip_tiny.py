"""Tiny open_clip models of each family (CLIP ViT with and without QuickGELU, SigLIP, SigLIP2, PE-Core, ConvNeXt,
XLM-R) with random weights saved to local files, and tiny tokenizer folders built offline, for the fidelity tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SENTENCES = ["Der Bundestag beschließt ein neues Gesetz zur Energie.", "A red bus drives through the city at night.",
             "Fußball: Bayern gewinnt gegen Dortmund", "flood waters rise along the river bank",
             "the minister speaks to reporters in Berlin", "Ein Hund spielt im Schnee"]


@dataclass(frozen=True)
class Family:
    """One tiny model: its architecture name in open_clip's registry, the weights file, and the job entry."""

    name: str
    arch: str
    weights: Path
    entry: dict  # the job's mapping entry for it


def _timm_models() -> None:
    """Tiny timm towers of the real families' classes: the published entry points with tiny widths and depths."""
    import timm
    from timm.models import convnext, eva, register_model, vision_transformer

    tiny = {
        "newsclip_tiny_siglip": (vision_transformer.vit_base_patch16_siglip_224,
                                 {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}),
        "newsclip_tiny_pe_core": (eva.vit_pe_core_base_patch16_224,
                                  {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32,
                                   "ref_feat_shape": (4, 4), "attn_pool_num_heads": 2}),
        "newsclip_tiny_convnext": (convnext.convnext_base, {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}),
    }
    for name, (entry_point, overrides) in tiny.items():
        if timm.models.is_model(name):
            continue

        def build(pretrained=False, _fn=entry_point, _over=overrides, **kwargs):
            return _fn(pretrained=False, **dict(_over, **kwargs))

        build.__name__ = name
        register_model(build)


def _tokenizer_folder(folder: Path, kind: str) -> Path:
    """A Hugging Face tokenizer trained on a few sentences, saved with transformers' class for the family."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>", "<s>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(SENTENCES * 4, trainers.UnigramTrainer(vocab_size=120, special_tokens=specials,
                                                                   unk_token="<unk>"))
    if kind == "xlmr":
        from tokenizers import processors
        from transformers import XLMRobertaTokenizerFast

        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3),
                                                                                                   ("</s>", 1)])
        fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    else:
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast

        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


def _text_tower_folder(folder: Path) -> Path:
    from transformers import XLMRobertaConfig

    XLMRobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=96, pad_token_id=0, bos_token_id=3,
                     eos_token_id=1).save_pretrained(folder)
    return folder


SMALL_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
SIGLIP_TEXT = {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True,
               "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
               "tokenizer_kwargs": {"clean": "canonicalize"}}
SQUASH = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}


def build(root: Path) -> dict[str, Family]:
    """Register the tiny configs with open_clip, save each one's random weights and tokenizer under `root`."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    _timm_models()
    root.mkdir(parents=True, exist_ok=True)
    siglip_tok = _tokenizer_folder(root / "siglip-tokenizer", "siglip")
    xlmr = _tokenizer_folder(root / "xlmr", "xlmr")
    _text_tower_folder(xlmr)
    vit = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    configs = {
        "clip-vit": ({"embed_dim": 16, "vision_cfg": vit, "text_cfg": SMALL_TEXT}, {}),
        "clip-vit-quickgelu": ({"embed_dim": 16, "quick_gelu": True, "vision_cfg": vit, "text_cfg": SMALL_TEXT},
                               {"preprocess": {"interpolation": "bilinear"}}),
        "siglip": ({"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                    "vision_cfg": {"image_size": 32, "timm_model_name": "newsclip_tiny_siglip", "timm_pool": "map",
                                   "timm_proj": "none"},
                    "text_cfg": {**SIGLIP_TEXT, "hf_tokenizer_name": str(siglip_tok)}}, {"preprocess": SQUASH}),
        "siglip2": ({"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
                     "vision_cfg": {"image_size": 32, "timm_model_name": "newsclip_tiny_siglip", "timm_pool": "map",
                                    "timm_proj": "none"},
                     "text_cfg": {**SIGLIP_TEXT, "hf_tokenizer_name": "timm/not-cached-siglip2-tokenizer",
                                  "act_kwargs": {"approximate": "tanh"}}},
                    {"preprocess": SQUASH, "tokenizer": str(siglip_tok)}),
        "pe-core": ({"embed_dim": 16, "custom_text": True,
                     "vision_cfg": {"image_size": 32, "timm_model_name": "newsclip_tiny_pe_core", "timm_pool": "map",
                                    "timm_proj": None},
                     "text_cfg": {**SMALL_TEXT, "width": 32}},
                    {"preprocess": {**SQUASH, "interpolation": "bilinear"}}),
        "convnext": ({"embed_dim": 16, "vision_cfg": {"timm_model_name": "newsclip_tiny_convnext", "timm_pool": "",
                                                      "timm_proj": "linear", "image_size": 32},
                      "text_cfg": SMALL_TEXT}, {}),
        "xlm-roberta": ({"embed_dim": 16, "vision_cfg": vit,
                         "text_cfg": {"hf_model_name": str(xlmr), "hf_tokenizer_name": str(xlmr),
                                      "hf_pooler_type": "mean_pooler", "context_length": 24}},
                        {"text": "original"}),
    }
    configs_dir = root / "configs"
    configs_dir.mkdir(exist_ok=True)
    for family, (cfg, _) in configs.items():
        (configs_dir / f"newsclip-tiny-{family}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(configs_dir)
    families = {}
    for i, (family, (_, options)) in enumerate(configs.items()):
        arch = f"newsclip-tiny-{family}"
        torch.manual_seed(i)
        model = open_clip.create_model(arch, pretrained_text=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if i % 2:
            weights = root / f"{family}.safetensors"
            save_file(state, str(weights))
        else:
            weights = root / f"{family}.pt"
            torch.save(state, weights)
        families[family] = Family(family, arch, weights, {"open_clip": arch, "pretrained": str(weights), **options})
    return families


def reference(family: Family, texts: list[str], images: list) -> tuple:
    """open_clip's own normalised encode_text(tokenizer(texts)) and encode_image(preprocess(img)), fp32."""
    import open_clip
    import torch

    pre = {f"image_{k}": v for k, v in family.entry.get("preprocess", {}).items()}
    model, _, preprocess = open_clip.create_model_and_transforms(family.arch, pretrained=str(family.weights), **pre)
    if "tokenizer" in family.entry:  # the Hub name in the config, the folder in the job: the same tokenizer
        tokenizer = open_clip.tokenizer.HFTokenizer(family.entry["tokenizer"],
                                                    context_length=model.context_length if hasattr(
                                                        model, "context_length") else 16, clean="canonicalize")
    else:
        tokenizer = open_clip.get_tokenizer(family.arch)
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer(texts), normalize=True)
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
    return text.numpy(), image.numpy()
