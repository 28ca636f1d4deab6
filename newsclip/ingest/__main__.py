"""`python -m newsclip.ingest CONFIG [--set k=v]`: the ingest command on its own."""

import sys

from newsclip.ingest.cli import standalone

if __name__ == "__main__":
    sys.exit(standalone())
