"""Synthetic demo data, the demo-tiny CLIP and the demo translator: everything runs with no download."""
