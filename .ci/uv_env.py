"""Print pip's configuration on this machine (its indexes, local wheel folders, constraints and CA bundle) as
`export` lines for uv, so that `uv pip install` installs what `pip install` would, from the same places.

`make setup` installs with uv (about twice as fast as pip here: it unpacks torch's wheels in parallel)."""

import shlex
import subprocess
import sys

UV = {"index-url": "UV_INDEX_URL", "extra-index-url": "UV_EXTRA_INDEX_URL", "find-links": "UV_FIND_LINKS",
      "constraint": "UV_CONSTRAINT", "cert": "SSL_CERT_FILE"}

listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
found: dict[str, str] = {}
for line in listing.stdout.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='/opt/wheels'
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in UV and value:
        found[UV[name]] = " ".join(shlex.split(value))  # pip's quoting off; several values stay space-separated
if "UV_EXTRA_INDEX_URL" in found or "UV_FIND_LINKS" in found:
    found["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's rule: the best version across every index
for name, value in sorted(found.items()):
    print(f"export {name}={shlex.quote(value)}")
