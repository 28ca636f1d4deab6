"""Argos Translate packages: the offline environment, installing `.argosmodel` files, and finding what is installed."""

from __future__ import annotations

import json
import os
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from newsclip.runtime.embedding_store import content_key

ARGOS_SUFFIX = ".argosmodel"
INSTALL_COMMAND = "newsclip translate install PATH"
_install_lock = threading.Lock()


class MissingLanguagePackageError(RuntimeError):
    """Articles need a language pair that no installed Argos package translates."""

    def __init__(self, lang: str, n_articles: int, packages_dir: str | Path, target: str = "en", where: str = ""):
        self.lang, self.n_articles, self.packages_dir, self.target = lang, n_articles, str(packages_dir), target
        super().__init__(
            f"no Argos Translate package for {lang!r} -> {target!r} in {self.packages_dir}: {n_articles} "
            f"article(s) in language {lang!r}{' ' + where if where else ''} need it. Install one (a .argosmodel "
            f"file or a folder of them) where the job looks, with `{INSTALL_COMMAND} --packages-dir "
            f"{self.packages_dir}` (e.g. `newsclip translate install translate-{lang}_{target}.argosmodel "
            f"--packages-dir {self.packages_dir}`), or set "
            f"translate.on_missing_package: skip to leave these articles out (they go to rejects/ with this reason).")


def argos_env(packages_dir: str | Path, device: str = "cpu", threads: int = 1) -> dict[str, str]:
    """Environment variables that point Argos Translate at `packages_dir` and keep it offline.

    Argos reads these when `argostranslate.settings` is first imported, so set them before that import: in
    os.environ of this process (`import_argos` does it), a subprocess's env, or a Ray actor's runtime_env.
    XDG dirs move Argos' data/config/cache folders (created at import) and MiniSBD's download cache next to
    the packages instead of $HOME; the package index points at a local path so no code path can fetch it.
    """
    root = Path(packages_dir).expanduser().resolve()
    home = root.parent / (root.name + ".argos-home")
    threads = max(1, int(threads))
    return {
        "ARGOS_PACKAGES_DIR": str(root),
        "ARGOS_DEVICE_TYPE": "cuda" if str(device).startswith("cuda") else "cpu",
        "ARGOS_INTER_THREADS": "1",
        "ARGOS_INTRA_THREADS": str(threads),
        "ARGOS_PACKAGE_INDEX": (home / "no-index").as_uri() + "/",
        "ARGOS_DEBUG": "0",
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        # CTranslate2 and torch (stanza) use OpenMP: spin-waiting threads made 2 processes on 2 cores ~10x slower
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "STANZA_RESOURCES_DIR": str(home / "stanza"),
    }


def import_argos(packages_dir: str | Path | None = None, device: str = "cpu", threads: int = 1,
                 also: tuple[str, ...] = ()):
    """Import argostranslate's `package` and `settings`, and the submodules named in `also` (e.g. "translate"),
    with `argos_env` applied while they import (its ARGOS_* on the first import only).

    Returns the `argostranslate` module. If it was imported earlier with other settings, this module's own
    functions still pass explicit paths, so they work on `packages_dir` regardless. `translate` and `sbd` import
    spaCy, stanza and transformers: 5 s a process, so they are imported only where they are used.
    """
    import importlib
    import sys

    names = ["argostranslate", "argostranslate.package", "argostranslate.settings",
             *(f"argostranslate.{name}" for name in also)]
    missing = [name for name in names if name not in sys.modules]
    if missing:
        first = "argostranslate.settings" in missing
        env = argos_env(packages_dir if packages_dir is not None else _default_packages_dir(), device, threads)
        # XDG and stanza dirs matter only while Argos (and stanza, minisbd) import; put them back afterwards so the
        # rest of this process (torch hub, other caches) keeps its own. ARGOS_* stay; thread settings are defaults.
        scoped = {k: os.environ.get(k) for k in env if k.startswith(("XDG_", "STANZA_"))}
        for key, value in env.items():
            if (first and key.startswith("ARGOS_")) or key.startswith(("XDG_", "STANZA_")) or key not in os.environ:
                os.environ[key] = value
        try:
            for name in missing:
                importlib.import_module(name)
        finally:
            for key, old in scoped.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
    return sys.modules["argostranslate"]


def _default_packages_dir() -> Path:
    from newsclip.retrieval.backbones import cache_dir

    return cache_dir() / "argos-packages"


def _package_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(p.glob(f"*{ARGOS_SUFFIX}"))
            if not found:
                raise FileNotFoundError(f"no {ARGOS_SUFFIX} files in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such package file or folder: {p}")
    return files


def read_package_metadata(path: str | Path) -> dict:
    """metadata.json of a `.argosmodel` zip, checked to be a translate package with from/to codes."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an Argos package (must be a zip archive)")
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("metadata.json") and n.count("/") == 1]
        if not names:
            raise ValueError(f"{path} has no <folder>/metadata.json: not an Argos package")
        meta = json.loads(zf.read(names[0]))
        top = names[0].split("/")[0]
        if not any(n.startswith(f"{top}/model/") for n in zf.namelist()):
            raise ValueError(f"{path} has no model/ folder: not an Argos translate package")
    if not meta.get("from_code") or not meta.get("to_code"):
        raise ValueError(f"{path}: metadata.json lacks from_code/to_code")
    meta["_folder"] = top
    return meta


def install_packages(paths: list[Path], packages_dir: Path) -> list[str]:
    """Install `.argosmodel` files (or folders of them) into `packages_dir` with Argos' own installer.

    Returns the installed package folder names. Nothing touches the network: Argos' `install_from_path` only
    unzips; its target folder is pointed at `packages_dir` for the call, whatever Argos read at import.
    """
    packages_dir = Path(packages_dir).expanduser().resolve()
    files = _package_files(paths)
    metas = [read_package_metadata(f) for f in files]  # validate all before installing any
    packages_dir.mkdir(parents=True, exist_ok=True)
    argos = import_argos(packages_dir)
    settings, package = argos.settings, argos.package
    installed = []
    with _install_lock:
        previous = settings.package_data_dir
        settings.package_data_dir = packages_dir
        try:
            for f, meta in zip(files, metas):
                package.install_from_path(f)
                installed.append(meta["_folder"])
        finally:
            settings.package_data_dir = previous
    return installed


def installed_packages(packages_dir: str | Path) -> list[dict]:
    """metadata.json of every package folder in `packages_dir` (with `path` added), without importing Argos."""
    root = Path(packages_dir).expanduser()
    out = []
    if not root.is_dir():
        return out
    for meta_path in sorted(root.glob("*/metadata.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("type", "translate") != "translate" or not (meta_path.parent / "model").is_dir():
            continue
        meta["path"] = str(meta_path.parent)
        out.append(meta)
    return out


def installed_pairs(packages_dir: str | Path) -> set[tuple[str, str]]:
    """(from_code, to_code) of the translate packages installed in `packages_dir`; reads metadata.json only."""
    return {(m["from_code"], m["to_code"]) for m in installed_packages(packages_dir)
            if m.get("from_code") and m.get("to_code")}


def translator_key(t) -> str:
    """What decides a translation besides the text: the installed packages and the settings that change output
    (`t`: a resolved TranslateConfig)."""
    packages = [{k: v for k, v in meta.items() if k != "path"} for meta in installed_packages(t.packages_dir)]
    return content_key(json.dumps([packages, t.target, t.max_chars, t.on_missing_package], sort_keys=True))


def require_packages(lang_counts: Mapping[str, int], packages_dir: str | Path, target: str = "en") -> None:
    """Raise MissingLanguagePackageError for the first language (most articles first) without a package.

    For the driver at job start: `lang_counts` maps each non-target language to its article count.
    """
    pairs = installed_pairs(packages_dir)
    for lang, n in sorted(lang_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if lang and lang != target and n > 0 and (lang, target) not in pairs:
            raise MissingLanguagePackageError(lang, n, packages_dir, target)
