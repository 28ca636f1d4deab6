"""The translate stage: a Ray Data callable class that turns non-English titles and bodies into English with Argos."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from newsclip.runtime.store import files_sha256
from newsclip.translate.detect import normalize_lang, resolve_lang
from newsclip.translate.packages import MissingLanguagePackageError, import_argos, installed_packages
from newsclip.workers.shard_rows import read_units

log = logging.getLogger(__name__)

ON_MISSING = ("error", "skip")
# A detected (not given) language below this confidence is not trusted enough to translate, or to stop a job
# for a missing package: such rows pass through untranslated with a note.
DETECT_MIN_CONFIDENCE = 0.5
# Sentences longer than this (no punctuation for pages) are cut at spaces into pieces: CTranslate2 cuts
# inputs at 1,024 tokens and outputs at 256, so one huge "sentence" would lose most of its text.
MAX_SENTENCE_CHARS = 500
OUTPUT_COLUMNS = ("article_id", "title", "text", "title_en", "text_en", "lang", "lang_confidence", "translated",
                  "truncated", "translate_note", "splitter")
NO_PACKAGE = "package installed: not translated"  # the end of the note on a row skipped for a missing package


@dataclass(frozen=True)
class TranslateConfig:
    """The translate stage's settings (the job config's `translate:` section)."""

    enabled: bool = True
    packages_dir: str | None = None  # installed .argosmodel packages; None: $NEWSCLIP_CACHE/argos-packages
    target: str = "en"
    on_missing_package: Literal["error", "skip"] = "error"  # error: stop at job start; skip: rejects/ with reason
    max_chars: int = 20000  # per title or body; longer ones are cut (at a space) and counted as truncated
    batch_size: int = 64  # sentences per CTranslate2 batch
    threads: int = 1  # CTranslate2 intra-op threads per actor
    cache_dir: str | None = None  # sha256(package id + text) -> English; None: $NEWSCLIP_CACHE/translations
    actors: int = 1  # translator actor pool size
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0  # > 0: CTranslate2 runs on CUDA in the actor
    part_rows: int = 5_000  # rows per part of translated/ at most, each part sorted in the driver's memory

    def resolved(self) -> TranslateConfig:
        """This config with its folders made absolute, so every actor on every node reads the same ones."""
        from newsclip.retrieval.backbones import cache_dir

        packages = Path(self.packages_dir).expanduser() if self.packages_dir else cache_dir() / "argos-packages"
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else cache_dir() / "translations"
        return replace(self, packages_dir=str(packages.absolute()), cache_dir=str(cache.absolute()))

    def __post_init__(self) -> None:
        # messages start with the key: the job-config loader prefixes the section ("translate.")
        if self.on_missing_package not in ON_MISSING:
            raise ValueError(f"on_missing_package: {self.on_missing_package!r} is not one of 'error', 'skip'")
        for key in ("max_chars", "batch_size", "threads", "actors", "part_rows"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)!r}")
        if not self.target:
            raise ValueError("target: must be a language code such as 'en'")


class TranslationCache:
    """sqlite in WAL mode: many actors (processes) read and write one file; the first writer of a key wins.

    Keys are sha256(package id + NUL + source text), so a new model version never reuses old translations.
    Meant for a local or node-local disk (sqlite locking over NFS is unreliable).
    """

    FILENAME = "translations.sqlite"

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir).expanduser() / self.FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @staticmethod
    def key(package_id: str, text: str) -> str:
        return hashlib.sha256(f"{package_id}\x00{text}".encode()).hexdigest()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=120, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, package TEXT NOT NULL, "
                         "english TEXT NOT NULL, created REAL NOT NULL)")
            self._conn = conn
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._lock:
            db = self._db()
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = f"SELECT key, english FROM translations WHERE key IN ({','.join('?' * len(chunk))})"
                out.update(db.execute(q, chunk).fetchall())
        return out

    def put_many(self, rows: list[tuple[str, str, str]]) -> None:
        """rows: (key, package id, english)."""
        if not rows:
            return
        now = time.time()
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO translations VALUES (?, ?, ?, ?)",
                               [(k, p, e, now) for k, p, e in rows])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@dataclass
class _LoadedPackage:
    package: object  # argostranslate.package.Package
    translator: object  # ctranslate2.Translator
    split: object  # callable: paragraph -> list of sentences
    splitter: str  # which sentence splitter, for the report
    package_id: str


def _package_id(meta: dict) -> str:
    """from_to@version plus a hash of the model weights and tokenizer: the cache key's package part."""
    root = Path(meta["path"])
    files = [root / name for name in ("model/model.bin", "sentencepiece.model", "bpe.model") if (root / name).exists()]
    return f"{meta['from_code']}_{meta['to_code']}@{meta.get('package_version', '')}#{files_sha256(files)[:16]}"


def _cut_long(sentence: str) -> list[str]:
    if len(sentence) <= MAX_SENTENCE_CHARS:
        return [sentence]
    pieces, rest = [], sentence
    while len(rest) > MAX_SENTENCE_CHARS:
        cut = rest.rfind(" ", 0, MAX_SENTENCE_CHARS)
        cut = cut if cut > MAX_SENTENCE_CHARS // 2 else MAX_SENTENCE_CHARS
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [p for p in pieces + [rest] if p]


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to at most `max_chars`, at the last space in the final tenth if there is one."""
    if len(text) <= max_chars:
        return text, False
    cut = text.rfind(" ", int(max_chars * 0.9), max_chars + 1)
    return text[: cut if cut > 0 else max_chars].rstrip(), True


class Translator:
    """Ray Data stage: title/text in any language with an installed Argos package -> English (`title_en`, `text_en`).

    `__init__` imports Argos once with its environment pointed at `cfg.packages_dir` (see `argos_env`) and loads
    each language's package the first time a batch needs it. `__call__` translates all sentences of a batch
    that share a language in one CTranslate2 `translate_batch` call, reusing the package's own sentence
    splitter and SentencePiece tokenizer exactly as `argostranslate.translate.apply_packaged_translation`
    does (so results equal `argostranslate.translate.translate`), with a persistent cache in front.
    """

    def __init__(self, cfg: TranslateConfig, device: str = "cpu"):
        self.device = device
        cfg = self.cfg = cfg.resolved()
        self.packages_dir = Path(cfg.packages_dir)
        self._argos = import_argos(self.packages_dir, device, cfg.threads)
        self._available = {m["from_code"]: m for m in installed_packages(self.packages_dir)
                           if m.get("to_code") == cfg.target}
        self._loaded: dict[str, _LoadedPackage] = {}
        self._package_ids: dict[str, str] = {}
        self.cache = TranslationCache(cfg.cache_dir) if cfg.cache_dir else None
        self.stats: Counter = Counter()
        self.splitters: dict[str, str] = {}  # language -> sentence splitter in use

    # ------------------------------------------------------------------------------------------ packages

    def has_package(self, lang: str) -> bool:
        return lang in self._available

    def package_id(self, lang: str) -> str:
        """The cache's name for the lang->target package (hashes its files; does not load the model)."""
        if lang not in self._package_ids:
            self._package_ids[lang] = _package_id(self._available[lang])
        return self._package_ids[lang]

    def _load(self, lang: str) -> _LoadedPackage:
        if lang in self._loaded:
            return self._loaded[lang]
        import ctranslate2
        from argostranslate.package import Package

        meta = self._available[lang]
        pkg = Package(Path(meta["path"]))
        split, splitter = self._splitter(pkg)
        cuda = str(self.device).startswith("cuda")
        index = int(str(self.device).split(":")[1]) if cuda and ":" in str(self.device) else 0
        translator = ctranslate2.Translator(str(Path(meta["path"]) / "model"), device="cuda" if cuda else "cpu",
                                            device_index=index, inter_threads=1, intra_threads=self.cfg.threads,
                                            compute_type="auto")
        loaded = _LoadedPackage(pkg, translator, split, splitter, self.package_id(lang))
        self._loaded[lang] = loaded
        self.splitters[lang] = splitter
        log.info("translate: loaded %s from %s on %s, splitter: %s", loaded.package_id, meta["path"], self.device,
                 splitter)
        return loaded

    def _splitter(self, pkg) -> tuple[object, str]:
        """The package's own splitter when it ships one that runs offline; never Argos' download fallback."""
        from newsclip.translate.splitter import split_sentences

        sbd = pkg.packaged_sbd_path
        if sbd is not None and sbd.name == "minisbd" and any(sbd.glob("*.onnx")):
            # what Argos' MiniSBDSentencizer does with a package's model, without importing argostranslate.sbd
            # (spaCy, stanza and transformers: 5 s of a small night)
            from minisbd import SBDetect

            model = next(sbd / name for name in os.listdir(sbd) if name.endswith(".onnx"))  # Argos' pick
            detector = SBDetect(str(model), use_gpu=str(self.device).startswith("cuda"))
            return detector.sentences, f"minisbd ({model.name} from the package)"
        if sbd is not None and sbd.name == "stanza":
            try:
                import stanza

                # download_method=None: Argos' own StanzaSentencizer lets stanza fetch resources.json online
                pipeline = stanza.Pipeline(lang=pkg.from_code, dir=str(sbd), processors="tokenize",
                                           use_gpu=str(self.device).startswith("cuda"), logging_level="WARNING",
                                           download_method=None)
                return (lambda text: [s.text for s in pipeline(text).sentences]), "stanza (from the package)"
            except Exception as e:  # a package whose stanza folder is incomplete: fall back, say so
                log.warning("translate: stanza splitter of %s unusable offline (%s); using rules", pkg.from_code, e)
        return split_sentences, "newsclip rule-based (the package has no offline splitter)"

    # ------------------------------------------------------------------------------------------- translation

    def translate_texts(self, lang: str, texts: list[str]) -> list[str]:
        """English for each text (paragraphs split on newlines, then sentences), in one translate_batch call."""
        loaded = self._load(lang)
        pkg = loaded.package
        plan: list[list[list[int]]] = []  # text -> paragraph -> indices into `sentences`
        sentences: list[list[str]] = []
        for text in texts:
            paragraphs = []
            for paragraph in text.split("\n"):
                idx = []
                for sentence in loaded.split(paragraph) if paragraph.strip() else []:
                    for piece in _cut_long(sentence):
                        idx.append(len(sentences))
                        sentences.append(pkg.tokenizer.encode(piece))
                paragraphs.append(idx)
            plan.append(paragraphs)
        hyps: list[list[str]] = []
        if sentences:
            settings = self._argos.settings
            prefix = [[pkg.target_prefix]] * len(sentences) if pkg.target_prefix else None
            results = loaded.translator.translate_batch(
                sentences, target_prefix=prefix, replace_unknowns=True, max_batch_size=self.cfg.batch_size,
                batch_type="examples", beam_size=max(1, settings.beam_size), num_hypotheses=1, length_penalty=0.2)
            hyps = [r.hypotheses[0] for r in results]
            self.stats["translate_calls"] += 1
            self.stats["sentences_translated"] += len(sentences)
        out = []
        for paragraphs in plan:
            english = []
            for idx in paragraphs:
                value = pkg.tokenizer.decode([tok for i in idx for tok in hyps[i]]) if idx else ""
                if pkg.target_prefix and value.startswith(pkg.target_prefix):
                    value = value[len(pkg.target_prefix):]
                english.append(value[1:] if value.startswith(" ") else value)
            out.append("\n".join(english).lstrip("\n"))  # as Argos combines paragraphs
        return out

    def _translate_cached(self, lang: str, texts: list[str]) -> list[str]:
        unique = list(dict.fromkeys(texts))
        found: dict[str, str] = {}
        keys: dict[str, str] = {}
        if self.cache is not None:  # all hits: the model is never even loaded
            package_id = self.package_id(lang)
            keys = {t: TranslationCache.key(package_id, t) for t in unique}
            hits = self.cache.get_many(list(keys.values()))
            found = {t: hits[k] for t, k in keys.items() if k in hits}
            self.stats["cache_hits"] += len(found)
        todo = [t for t in unique if t not in found]
        if todo:
            english = self.translate_texts(lang, todo)
            found.update(zip(todo, english))
            if self.cache is not None:
                package_id = self.package_id(lang)
                self.cache.put_many([(keys[t], package_id, e) for t, e in zip(todo, english)])
        return [found[t] for t in texts]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["article_id"])
        titles = list(batch.get("title", [None] * n))
        texts = list(batch.get("text", [None] * n))
        given = list(batch["lang"]) if "lang" in batch else [None] * n
        titles = [t if isinstance(t, str) else None for t in titles]
        texts = [t if isinstance(t, str) else None for t in texts]
        target = self.cfg.target

        langs: list[str | None] = []
        confidence = np.zeros(n, dtype=np.float32)
        note: list[str | None] = [None] * n
        todo: dict[str, list[int]] = {}
        detected_rows = set()
        for i in range(n):
            lang, conf = resolve_lang(given[i], titles[i], texts[i])
            detected = normalize_lang(given[i]) is None
            if detected:
                detected_rows.add(i)
            langs.append(lang)
            confidence[i] = conf
            if lang is None or lang == target or not (titles[i] or texts[i]):
                continue
            if detected and conf < DETECT_MIN_CONFIDENCE:
                note[i] = f"language uncertain ({lang} at {conf:.2f}): not translated"
                self.stats["uncertain_language"] += 1
                continue
            todo.setdefault(lang, []).append(i)
        self.stats["rows"] += n

        missing = {lang: rows for lang, rows in todo.items() if not self.has_package(lang)}
        for lang, rows in missing.items():
            # a language the input declared stops the job (the driver checks those at job start); one that was
            # only detected (an unexpected script in an English feed) is skipped with a note, never a crash
            given_rows = [i for i in rows if i not in detected_rows]
            if self.cfg.on_missing_package == "error" and given_rows:
                raise MissingLanguagePackageError(lang, len(given_rows), self.packages_dir, target, "in this batch")
            for i in rows:
                note[i] = f"no {lang}->{target} {NO_PACKAGE}"
            self.stats[f"skipped_no_package_{lang}"] += len(rows)
            del todo[lang]

        title_en: list[str | None] = list(titles)
        text_en: list[str | None] = list(texts)
        translated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        splitter: list[str | None] = [None] * n
        for lang, rows in todo.items():
            sources: list[str] = []
            slots: list[tuple[int, str]] = []
            for i in rows:
                for field, value in (("title", titles[i]), ("text", texts[i])):
                    if value:
                        value, cut = truncate(value, self.cfg.max_chars)
                        truncated[i] |= cut
                        sources.append(value)
                        slots.append((i, field))
            english = self._translate_cached(lang, sources)
            for (i, field), value in zip(slots, english):
                (title_en if field == "title" else text_en)[i] = value
            translated[rows] = True
            for i in rows:
                splitter[i] = self.splitters.get(lang)
            self.stats[f"translated_{lang}"] += len(rows)
        self.stats["truncated"] += int(truncated.sum())

        return {
            "article_id": np.asarray(batch["article_id"]),
            "title": _objects(titles), "text": _objects(texts),
            "title_en": _objects(title_en), "text_en": _objects(text_en),
            "lang": _objects(langs), "lang_confidence": confidence,
            "translated": translated, "truncated": truncated, "translate_note": _objects(note),
            "splitter": _objects(splitter),
        }


class QueryTranslator:
    """The Translator over units of work (file, ids): it reads the prepared query rows a unit names from their shard
    itself (the driver never holds the archive's texts) and translates them `batch_size` at a time."""

    def __init__(self, cfg: TranslateConfig, device: str = "cpu", batch_size: int = 256):
        self.translator = Translator(cfg, device)
        self.batch_size = batch_size

    def __call__(self, units: pa.Table) -> pa.Table:
        rows = read_units(units, "article_id", ["article_id", "title", "body", "lang"])
        rows = rows.rename_columns(["article_id", "title", "text", "lang"]).combine_chunks()
        out = [pa.table(self.translator({name: column.to_numpy(zero_copy_only=False) for name, column in
                                         zip(rows.column_names, rows.slice(start, self.batch_size).columns)}))
               for start in range(0, len(rows), self.batch_size)]
        return pa.concat_tables(out, promote_options="permissive")  # a column all null in one batch has no type


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
