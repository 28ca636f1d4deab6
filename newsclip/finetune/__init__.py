"""Contrastive fine-tuning of a CLIP backbone on the archive's own article/image pairs, with Ray Train."""
