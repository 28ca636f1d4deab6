"""Ray job entry: `newsclip run JOB.yaml`, then publish the committed output to a path or URI (s3://, gs://...).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/submit.py jobs/newsimages2022.yaml --set output_dir=/mnt/newsclip/out/ni2022 \\
        --publish s3://my-bucket/newsclip/ni2022

The stages write `output_dir` with local paths, and Ray Data's workers write and read it too, so on a cluster
of several nodes `output_dir` must be a shared mount (NFS, EFS, Filestore) at the same path on every node. On a
single node any local folder works. `--publish` copies the current outputs (the files the manifest says the stages
committed last, and the resolved config; never the lock, `.staging/`, logs or the store) through pyarrow's
filesystems once the job succeeded, `manifest.json` last, so a reader that sees the manifest sees everything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def publish(output: Path, uri: str) -> list[str]:
    """Copy the job's current outputs under `output` to `uri` (a path or a pyarrow URI): the files the manifest says
    the stages committed last, and the resolved config; the manifest goes last. Nothing else under `output` (the
    lock, `.staging/`, logs, run records, the embedding store) is copied."""
    import pyarrow.fs as pafs

    from newsclip.runtime.layout import Layout
    from newsclip.runtime.store import current_files

    layout = Layout(output)
    if not layout.manifest.is_file():
        raise FileNotFoundError(f"{layout.manifest} does not exist: nothing was committed to publish")
    if "://" not in uri:
        uri = str(Path(uri).expanduser().absolute())
    filesystem, root = pafs.FileSystem.from_uri(uri)
    files = [f for f in [*current_files(output), layout.relative(layout.resolved_config)] if (output / f).is_file()]
    copied = []
    for relative in [*files, layout.relative(layout.manifest)]:
        target = f"{root.rstrip('/')}/{relative}"
        filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(output / relative), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)
        copied.append(relative)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--publish", metavar="URI", help="copy the job's output here when it succeeded")
    args = parser.parse_args(argv)

    from newsclip import config
    from newsclip.cli import main as newsclip_main

    status = newsclip_main(["run", str(args.job), *(f"--set={o}" for o in args.overrides)])
    if status == 0 and args.publish:
        output = config.load(args.job, args.overrides).output
        copied = publish(output, args.publish)
        print(f"published {len(copied)} files from {output} to {args.publish}")
    return status


if __name__ == "__main__":
    sys.exit(main())
