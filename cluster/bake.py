"""Build-time fetch for the container image: OpenAI CLIP checkpoints and Argos Translate packages, verified.

    python cluster/bake.py --clip RN50 ViT-B/32 --argos de:en [--clip-root DIR] [--packages-dir DIR] [--dry-run]

Runs in `cluster/Dockerfile` (the only place newsclip downloads models); jobs then find everything offline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Argos' own index and downloader run in a child process with default settings: newsclip points Argos at a local,
# empty index (newsclip.translate.packages.argos_env) so that no job can fetch anything.
_ARGOS_DOWNLOAD = """
import json, sys
import argostranslate.package as package
package.update_package_index()
wanted = {tuple(p.split(":")) for p in sys.argv[1:]}
found = {(a.from_code, a.to_code): a for a in package.get_available_packages() if (a.from_code, a.to_code) in wanted}
missing = sorted(":".join(p) for p in wanted - set(found))
if missing:
    sys.exit(f"no Argos package in the index for {', '.join(missing)}")
print(json.dumps([str(a.download()) for a in found.values()]))
"""


def parse_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        source, sep, target = pair.partition(":")
        if not sep or len(source) != 2 or len(target) != 2:
            raise SystemExit(f"--argos {pair!r}: expected from:to ISO 639-1 codes, e.g. de:en")
        out.append((source, target))
    return out


def fetch_clip(names: list[str], root: Path | None) -> list[Path]:
    from newsclip.retrieval.backbones import prefetch, resolve_weights

    paths = []
    for name in names:
        prefetch(name, root)  # clip's downloader checks the file's sha256 against the one in its URL
        paths.append(resolve_weights(name, root))
    return paths


def fetch_argos(pairs: list[tuple[str, str]], packages_dir: Path) -> list[str]:
    from newsclip.translate.packages import install_packages, installed_pairs

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "XDG_DATA_HOME": f"{home}/data", "XDG_CONFIG_HOME": f"{home}/config",
               "XDG_CACHE_HOME": f"{home}/cache"}
        env = {k: v for k, v in env.items() if not k.startswith("ARGOS_")}
        result = subprocess.run([sys.executable, "-c", _ARGOS_DOWNLOAD, *(f"{a}:{b}" for a, b in pairs)],
                                env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"Argos download failed:\n{result.stderr[-3000:]}")
        files = [Path(p) for p in json.loads(result.stdout.strip().splitlines()[-1])]
        installed = install_packages(files, packages_dir)
    missing = set(pairs) - installed_pairs(packages_dir)
    if missing:
        raise SystemExit(f"Argos packages not installed for {sorted(missing)} in {packages_dir}")
    return installed


def main(argv: list[str] | None = None) -> int:
    from newsclip.retrieval.backbones import BACKBONES, cache_dir, default_clip_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", nargs="*", default=[], metavar="NAME", help="OpenAI CLIP backbones to fetch")
    parser.add_argument("--argos", nargs="*", default=[], metavar="FROM:TO", help="Argos language pairs, e.g. de:en")
    parser.add_argument("--clip-root", type=Path, default=None, help="default: clip's own ~/.cache/clip")
    parser.add_argument("--packages-dir", type=Path, default=None, help="default: $NEWSCLIP_CACHE/argos-packages")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan only")
    args = parser.parse_args(argv)

    unknown = [n for n in args.clip if n not in BACKBONES or n == "demo-tiny"]
    if unknown:
        parser.error(f"--clip: unknown OpenAI backbone(s) {unknown}; known: {sorted(set(BACKBONES) - {'demo-tiny'})}")
    pairs = parse_pairs(args.argos)
    clip_root = args.clip_root or default_clip_root()
    packages_dir = args.packages_dir or cache_dir() / "argos-packages"
    plan = {"clip": args.clip, "clip_root": str(clip_root), "argos": [f"{a}:{b}" for a, b in pairs],
            "packages_dir": str(packages_dir)}
    print(json.dumps(plan))
    if args.dry_run:
        return 0
    for path in fetch_clip(args.clip, clip_root):
        print(f"clip: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    if pairs:
        print(f"argos: installed {fetch_argos(pairs, packages_dir)} in {packages_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
