"""Embedding, the FAISS index and text-to-image search over it."""
