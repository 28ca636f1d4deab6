"""Code that Ray workers run: decoding and model actors (no polars, no faiss)."""
