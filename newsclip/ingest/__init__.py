"""`newsclip ingest`: NewsImages CSV/TSV files plus image folders (or image URLs) into the input contract's shards."""
