"""embedserve: an OpenAI-compatible text-embeddings server on raw PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"


def keep_checkout_off_path() -> None:
    """Drop a source checkout's root from ``sys.path`` (``python -m`` started there puts it first).

    The checkout's top-level ``kernels/`` would otherwise be found as the ``kernels`` distribution that
    transformers imports (embedserve installs it as ``embedserve.kernels``). Called by the entry points only,
    before anything imports transformers; in an installed copy there is no such root and nothing changes.
    """
    root = Path(__file__).resolve().parent.parent
    if not ((root / "kernels" / "pool_encode.py").is_file() and (root / "pyproject.toml").is_file()):
        return  # installed (site-packages is the parent): never drop that
    sys.path[:] = [p for p in sys.path if not (isinstance(p, str) and Path(p or ".").resolve() == root)]
