"""Content checksums of files: weights, labelled photos, index files, model versions.

One helper, read in blocks so a multi-gigabyte index is hashed in constant memory.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """Hex sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
