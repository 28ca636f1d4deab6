"""Pure retrieval: backbones, kNN search, fusion, metrics and the bootstrap."""
