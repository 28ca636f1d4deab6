"""Pure retrieval: backbones, kNN search, fusion, the truths' ranks, metrics and the bootstrap."""
