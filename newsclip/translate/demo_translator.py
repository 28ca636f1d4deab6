"""The demo de->en translator: a tiny Marian transformer trained on the demo templates, packed as an `.argosmodel`."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from newsclip.demo import news
from newsclip.demo.scenes import Scene
from newsclip.runtime.store import atomic_path

PACKAGE_FILENAME = "translate-de_en-demo.argosmodel"
PACKAGE_DIRNAME = "translate-de_en-demo"
PACKAGE_VERSION = "1.0"
FROM_CODE, FROM_NAME, TO_CODE, TO_NAME = "de", "German", "en", "English"

# Model and schedule (measured: 500/500 held-out sentences exact after 400 steps; 200 steps gave 42%,
# width 64 gave 54%, width 256 was slower and worse).
D_MODEL, LAYERS, HEADS, FFN = 128, 2, 4, 512
VOCAB_PIECES = 1000  # SentencePiece BPE; unigram stopped at 418 pieces and split words into letters
N_PAIRS, STEPS, BATCH, LR, WARMUP, DECAY_FRACTION = 100_000, 400, 128, 2e-3, 100, 0.3
# Sentence kinds in the training and evaluation mixtures: every demo article has one headline, one scene
# caption and a few fillers; captions have by far the most combinations, so they get half the draws.
MIXTURE = (("caption", 0.5), ("filler", 0.35), ("headline", 0.15))
EVAL_BUCKETS = 10  # 1 in 10 English sentences (by hash) is held out of training

# rng streams (numpy SeedSequence spawn keys): training pairs, held-out sentences, held-out paragraphs
_TRAIN_STREAM, _EVAL_STREAM, _PARAGRAPH_STREAM = 1, 2, 3


def split_of(english: str) -> str:
    """'eval' or 'train': the split is a hash of the English sentence, so a held-out sentence never trains."""
    digest = hashlib.sha256(("newsclip-demo-translator:" + english).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0 else "train"


def _draw(kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """One (english, german) sentence of the given kind, from the demo templates."""
    if kind == "caption":
        scene = Scene.sample(rng)
        return scene.caption("en"), scene.caption("de")
    if kind == "filler":
        return news.filler_sentence(rng)
    return news.headline(rng)


def sample_pairs(n: int, split: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`n` (german, english) sentence pairs of `split` ('train' or 'eval'), drawn from the demo mixture."""
    kinds = [k for k, _ in MIXTURE]
    probs = np.array([p for _, p in MIXTURE])
    pairs = []
    while len(pairs) < n:
        en, de = _draw(kinds[int(rng.choice(len(kinds), p=probs))], rng)
        if split_of(en) == split:
            pairs.append((de, en))
    return pairs


def _stream(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def eval_sentences(n: int = 500, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct held-out (german, english) sentences, none of which occurs in training."""
    rng = _stream(seed, _EVAL_STREAM)
    out: dict[str, str] = {}
    while len(out) < n:
        for de, en in sample_pairs(n - len(out), "eval", rng):
            out.setdefault(de, en)
    return list(out.items())[:n]


def eval_paragraphs(n: int = 100, seed: int = 0, fillers: int = 3) -> list[tuple[str, str]]:
    """`n` held-out article bodies as (german, english): a scene caption and `fillers` filler sentences."""
    rng = _stream(seed, _PARAGRAPH_STREAM)
    out = []
    for _ in range(n):
        sentences = []
        for kind in ["caption"] + ["filler"] * fillers:
            while True:
                en, de = _draw(kind, rng)
                if split_of(en) == "eval":
                    break
            sentences.append((de, en))
        out.append((" ".join(s[0] for s in sentences), " ".join(s[1] for s in sentences)))
    return out


# --------------------------------------------------------------------------------------------- training


def _train_sentencepiece(sentences: list[str]) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    # BPE, not unigram: on this small vocabulary unigram stopped at 418 pieces and split words into letters.
    # No BOS/EOS/PAD pieces: the Marian vocabulary adds </s> and <pad> itself; one thread for determinism.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=VOCAB_PIECES, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, unk_piece="<unk>", num_threads=1,
        minloglevel=2)
    return model.getvalue()


def _lr_at(step: int, steps: int) -> float:
    """Linear warm-up, constant, then cosine decay over the last DECAY_FRACTION (a plain cosine stalled)."""
    warmup = min(WARMUP, max(1, steps // 4))
    if step < warmup:
        return LR * (step + 1) / warmup
    decay_start = int(steps * (1 - DECAY_FRACTION))
    if step < decay_start:
        return LR
    t = (step - decay_start) / max(1, steps - decay_start)
    return LR * 0.5 * (1 + math.cos(math.pi * t))


def _pad(rows: list[list[int]], value: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class _Tokenizer:
    """The vocabulary the converter reads: what CTranslate2 stores as `shared_vocabulary.json`."""

    eos_token, unk_token = "</s>", "<unk>"

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def _build(staging: Path, seed: int, steps: int, n_pairs: int, threads: int, log: Callable[[str], None]) -> dict:
    """Train tokenizer and model, convert with CTranslate2, lay out the package directory in `staging`."""
    import torch

    # this process's torch thread count and global RNG are put back afterwards (in-process builds, tests)
    previous_threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.set_num_threads(threads)
            return _build_seeded(staging, seed, steps, n_pairs, threads, log)
    finally:
        torch.set_num_threads(previous_threads)


def _build_seeded(staging: Path, seed: int, steps: int, n_pairs: int, threads: int,
                  log: Callable[[str], None]) -> dict:
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel

    from newsclip.translate.splitter import build_sbd_onnx

    t0 = time.perf_counter()
    pairs = sample_pairs(n_pairs, "train", _stream(seed, _TRAIN_STREAM))
    unique = sorted({s for pair in pairs for s in pair})
    sp_bytes = _train_sentencepiece(unique)
    (staging / "sentencepiece.model").write_bytes(sp_bytes)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    # Marian's layout: </s> = 0, <unk> = 1, the pieces, <pad> last (the converter drops <pad>: CTranslate2
    # starts decoding from a zero embedding instead).
    tokens = ["</s>", "<unk>"] + [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())] + ["<pad>"]
    eos, pad, vocab = 0, len(tokens) - 1, len(tokens)
    piece_to_id = {t: i for i, t in enumerate(tokens)}

    def encode(text: str) -> list[int]:
        return [piece_to_id.get(p, 1) for p in sp.encode(text, out_type=str)]

    src = [encode(de) for de, _ in pairs]  # no source </s>: the converted config has add_source_eos false
    tgt = [encode(en) + [eos] for _, en in pairs]
    log(f"demo translator: {len(pairs)} pairs ({len(unique)} distinct sentences), "
        f"{sp.get_piece_size()} BPE pieces, {time.perf_counter() - t0:.1f} s")

    config = MarianConfig(
        vocab_size=vocab, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        activation_function="swish", max_position_embeddings=256, pad_token_id=pad, eos_token_id=eos,
        decoder_start_token_id=pad, forced_eos_token_id=eos, scale_embedding=True, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True)
    model = MarianMTModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_positions" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.98), eps=1e-9)
    order = np.random.default_rng(seed).permutation(len(pairs))
    t_train = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = order[(step * BATCH) % len(order):][:BATCH]
        if len(idx) < BATCH:  # wrap around (more steps than pairs / batch)
            idx = np.concatenate([idx, order[: BATCH - len(idx)]])
        src_ids = torch.from_numpy(_pad([src[i] for i in idx], pad))
        tgt_ids = torch.from_numpy(_pad([tgt[i] for i in idx], pad))
        dec_in = torch.cat([torch.full((len(idx), 1), pad, dtype=torch.long), tgt_ids[:, :-1]], dim=1)
        labels = tgt_ids.masked_fill(tgt_ids == pad, -100)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps)
        out = model(input_ids=src_ids, attention_mask=(src_ids != pad).long(), decoder_input_ids=dec_in)
        # The <pad> row stays out of the loss: CTranslate2 drops it, so the model must never need it.
        logits = out.logits[..., :pad]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, pad), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # keep the <pad> embedding at zero: CTranslate2 starts from a zero embedding
            model.model.shared.weight[pad].zero_()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"demo translator: step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} "
                f"lr {_lr_at(step, steps):.2e} {time.perf_counter() - t_train:.0f} s")
    train_seconds = time.perf_counter() - t_train

    _convert(model, tokens, staging / "model")
    build_sbd_onnx(staging / "minisbd" / f"{FROM_CODE}.onnx", FROM_CODE)
    log(f"demo translator: trained {n_params} parameters in {train_seconds:.1f} s")
    # no timings in here: the package's bytes must depend on the seed and settings only
    return {"seed": seed, "steps": steps, "pairs": n_pairs, "parameters": n_params,
            "final_loss": round(float(np.mean(losses[-20:])), 4), "threads": threads}


def _convert(model, tokens: list[str], out: Path) -> None:
    """Marian model -> CTranslate2 int8 via the Transformers converter, from a local folder (no hub)."""
    import ctranslate2

    with tempfile.TemporaryDirectory() as hf_dir:
        model.eval()
        model.save_pretrained(hf_dir)

        class _Converter(ctranslate2.converters.TransformersConverter):
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                return _Tokenizer(tokens)

        _Converter(hf_dir).convert(str(out), quantization="int8", force=True)


def _write_zip(staging: Path, out: Path) -> None:
    """A reproducible zip: sorted entries, fixed timestamps, under one top folder (Argos extracts it as is)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{PACKAGE_DIRNAME}/{path.relative_to(staging).as_posix()}", (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())


def _build_package(out_path: Path, seed: int, steps: int, n_pairs: int, threads: int,
                   log: Callable[[str], None]) -> Path:
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".demo-translator-") as tmp:
        staging = Path(tmp) / PACKAGE_DIRNAME
        staging.mkdir()
        build = _build(staging, seed, steps, n_pairs, threads, log)
        metadata = {
            "package_version": PACKAGE_VERSION, "argos_version": "1.0", "type": "translate",
            "from_code": FROM_CODE, "from_name": FROM_NAME, "to_code": TO_CODE, "to_name": TO_NAME,
            "links": [], "code": f"translate-{FROM_CODE}_{TO_CODE}-demo",
            "description": "newsclip demo translator: German demo-template sentences to English (not general German)",
            "newsclip": {"demo": True, "sentence_splitter": "minisbd rule-based", **build},
        }
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(
            "# newsclip demo translator (de -> en)\n\nA tiny Marian transformer trained by `newsclip demo-translator` "
            "on the synthetic demo templates only. It translates the demo's German sentences, nothing else.\n")
        with atomic_path(out_path) as tmp_zip:
            _write_zip(staging, tmp_zip)
    log(f"demo translator: wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB)")
    return out_path


def build_demo_translator(out_dir: Path, seed: int = 0, log: Callable[[str], None] = print, *,
                          steps: int = STEPS, n_pairs: int = N_PAIRS, threads: int = 1,
                          in_subprocess: bool = True) -> Path:
    """Write `out_dir/translate-de_en-demo.argosmodel`, trained from the demo templates; cached if it exists.

    Deterministic for (seed, steps, n_pairs, threads) on one machine. By default the training runs in a fresh
    Python process with OMP_WAIT_POLICY=PASSIVE and a fixed thread count: OpenMP reads its wait policy when
    torch loads, and its default spin-waiting made two busy processes on two cores ~10x slower.
    """
    out_dir = Path(out_dir).expanduser()
    out_path = out_dir / PACKAGE_FILENAME
    if out_path.exists():
        return out_path
    out_dir.mkdir(parents=True, exist_ok=True)
    if not in_subprocess:
        return _build_package(out_path, seed, steps, n_pairs, threads, log)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "newsclip.translate.demo_translator", str(out_dir), "--seed", str(seed),
           "--steps", str(steps), "--pairs", str(n_pairs), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-30:]
        if line.startswith("demo translator:"):
            log(line)
    if proc.wait() != 0 or not out_path.exists():
        raise RuntimeError(f"building the demo translator failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return out_path


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_package(path: Path, n_sentences: int = 500, n_paragraphs: int = 100, seed: int = 0) -> dict:
    """Exact-match rates of a built package through argostranslate, on held-out sentences and article bodies.

    Unzips into a temporary folder and uses Argos' own translation path (its MiniSBD sentencizer, its
    SentencePiece tokenizer and `apply_packaged_translation`), so nothing depends on installed packages.
    """
    from newsclip.translate.packages import import_argos

    argos = import_argos(also=("translate",))
    from argostranslate.package import Package
    from argostranslate.translate import Language, PackageTranslation

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)
        pkg = Package(Path(tmp) / PACKAGE_DIRNAME)
        translation = PackageTranslation(Language(pkg.from_code, pkg.from_name), Language(pkg.to_code, pkg.to_name),
                                         pkg)
        result: dict = {"argostranslate": argos.__version__ if hasattr(argos, "__version__") else "1.11"}
        for label, items in (("sentences", eval_sentences(n_sentences, seed)),
                             ("paragraphs", eval_paragraphs(n_paragraphs, seed))):
            t0 = time.perf_counter()
            outputs = [translation.translate(de) for de, _ in items]
            exact = sum(o == en for o, (_, en) in zip(outputs, items))
            result[label] = {"n": len(items), "exact": exact, "exact_rate": exact / len(items),
                             "seconds": round(time.perf_counter() - t0, 2),
                             "misses": [(de, en, o) for o, (de, en) in zip(outputs, items) if o != en][:5]}
    return result


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--pairs", type=int, default=N_PAIRS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate", action="store_true", help="also print exact-match rates as JSON")
    args = parser.parse_args(argv)
    path = build_demo_translator(args.out_dir, args.seed, steps=args.steps, n_pairs=args.pairs,
                                 threads=args.threads, in_subprocess=False,
                                 log=lambda m: print(m, flush=True))
    if args.evaluate:
        print(json.dumps(evaluate_package(path), indent=2, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    _main()
