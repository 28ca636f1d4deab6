"""The error for input files that ingest cannot read at all (distinct from bad rows, which become rejects)."""


class IngestError(ValueError):
    """Input files that cannot be ingested at all (a missing required column, an unparsable CSV)."""
