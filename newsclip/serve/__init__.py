"""Search and serve a job's committed index: a loaded snapshot, batched exact search, and the ASGI app."""
