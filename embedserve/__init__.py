"""embedserve: an OpenAI-compatible text-embeddings server on raw PyTorch."""

__version__ = "0.1.0"
