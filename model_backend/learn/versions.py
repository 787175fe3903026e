"""Model versions: every adapted model kept as its own file, listed in a JSON registry.

Adaptation never overwrites weights: each run writes a new file and records where it came from
(its parent), when, and its before/after validation figures, so an analyst can compare versions,
pick the active one and roll back to the parent in one click. Files live in the user data
directory (`$CDIKT_DATA_DIR`, else `$XDG_DATA_HOME/cdikt-qgis`, else ~/.local/share/cdikt-qgis),
never in the plugin folder, which an update replaces. The registry is rewritten atomically.

Which version is *active* is the caller's choice (the plugin keeps it in its settings as the
weights path); the registry only knows what exists.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model_backend.core.atomic import atomic_write_bytes
from model_backend.core.checksums import sha256_file
from model_backend.core.errors import InputError
from model_backend.core.locks import file_lock
from model_backend.core.paths import default_data_dir

REGISTRY = "registry.json"
LOCK = ".registry.lock"
LOCK_TIMEOUT_S = 60.0


@dataclass
class ModelVersion:
    id: str
    path: str
    parent: str | None
    """Id of the version it was adapted from, or None (its weights path is in `parent_path`)."""
    created: str
    parent_path: str | None = None
    """The weights file it was adapted from (None: the embedded default)."""
    name: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    """Validation before/after and what was trained (see adapt.AdaptResult.to_dict)."""
    sha256: str = ""
    """The file's content when recorded (`verify`); empty for entries older than the checksum."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Short text for a model picker: name, date and the validation figure after adaptation."""
        after = (self.figures.get("after") or {}).get("top1")
        fig = f", top-1 {100 * after:.0f} %" if isinstance(after, (int, float)) else ""
        return f"{self.name or self.id} ({self.created[:16].replace('T', ' ')}{fig})"


class ModelRegistry:
    """The versions under `root/models/`, read from and written to `root/models/registry.json`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_data_dir()
        self.folder = self.root / "models"
        self.file = self.folder / REGISTRY

    def versions(self) -> list[ModelVersion]:
        """Known versions, oldest first; entries whose file is gone are left out (not deleted)."""
        return [v for v in self._read() if Path(v.path).is_file()]

    def _read(self) -> list[ModelVersion]:
        if not self.file.is_file():
            return []
        try:
            doc = json.loads(self.file.read_text(encoding="utf-8"))
            return [ModelVersion(**entry) for entry in doc.get("versions", [])]
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"The model registry {self.file} is unreadable ({type(exc).__name__}); "
                             "move it away to start a new one.") from None

    def get(self, version_id: str) -> ModelVersion | None:
        return next((v for v in self._read() if v.id == version_id), None)

    def by_path(self, path: str | Path | None) -> ModelVersion | None:
        return _find(self._read(), path)

    def new_path(self, stem: str = "adapted") -> Path:
        """A fresh, unused weights path inside the registry folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        while True:
            p = self.folder / f"{stem}-{stamp}-{uuid.uuid4().hex[:6]}.safetensors"
            if not p.exists():
                return p

    def add(self, path: str | Path, parent_path: str | None, figures: dict[str, Any] | None = None,
            name: str = "") -> ModelVersion:
        """Record a new weights file (already written) as a version; its parent is looked up by path."""
        p = Path(path).absolute()
        if not p.is_file():
            raise InputError(f"Cannot register {p}: the file does not exist.")
        # Read, append and write under one lock: two processes adding at once both keep their version.
        with file_lock(self.folder / LOCK, timeout_s=LOCK_TIMEOUT_S, what="the model registry"):
            entries = self._read()
            parent = _find(entries, parent_path)
            version = ModelVersion(id=uuid.uuid4().hex[:12], path=str(p), parent=parent.id if parent else None,
                                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   parent_path=str(Path(parent_path).absolute()) if parent_path else None,
                                   name=name or p.stem, figures=dict(figures or {}), sha256=sha256_file(p))
            entries.append(version)
            self._write(entries)
        return version

    def check_writable(self) -> None:
        """Raise the InputError `add` would raise, before hours of work whose result it must record."""
        self._read()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"Cannot create the model folder {self.folder} ({exc.strerror}); "
                             "check the data folder's permissions.") from None
        if not os.access(self.folder, os.W_OK) or (self.file.exists() and not os.access(self.file, os.W_OK)):
            raise InputError(f"Cannot write the model registry in {self.folder}; check the data folder's permissions.")

    def verify(self, version: ModelVersion) -> bool:
        """Whether the version's file still has the content it was recorded with (old entries: unknown, True)."""
        return not version.sha256 or sha256_file(version.path) == version.sha256

    def check(self, path: str | Path | None) -> None:
        """Refuse, in one line, a registered version whose file changed since it was recorded (a
        damaged copy, or another file saved over it): it must not silently become the active model.
        Files the registry does not know (or the embedded default) are not its to judge."""
        version = self.by_path(path)
        if version is None:
            return
        if not Path(version.path).is_file():
            raise InputError(f"The model version {version.name or version.id} is gone ({version.path}); "
                             "choose another one.")
        if not self.verify(version):
            raise InputError(f"The model version {version.name or version.id} has changed since it was recorded "
                             f"({Path(version.path).name}: checksum differs); choose another one or adapt again.")

    def _write(self, entries: list[ModelVersion]) -> None:
        doc = {"format": 1, "versions": [v.to_dict() for v in entries]}
        try:
            atomic_write_bytes(self.file, json.dumps(doc, indent=1).encode("utf-8"))
        except OSError as exc:
            raise InputError(f"Cannot write the model registry {self.file} ({exc.strerror}); "
                             "check the data folder's permissions.") from None

    def parent_weights(self, path: str | Path | None) -> str | None:
        """The weights a version was adapted from (the rollback target); None = the embedded default."""
        v = self.by_path(path)
        if v is None:
            return None
        return v.parent_path


def _find(entries: list[ModelVersion], path: str | Path | None) -> ModelVersion | None:
    """The version whose weights file is `path` (compared as absolute paths), or None."""
    if not path:
        return None
    want = Path(path).absolute()
    return next((v for v in entries if Path(v.path).absolute() == want), None)
