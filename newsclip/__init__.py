"""newsclip: match news articles to their images with CLIP backbones, FAISS kNN and Ray Data."""

__version__ = "0.1.0"
