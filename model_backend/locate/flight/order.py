"""Which photos make the flight, and in which order they were taken.

Order decides everything downstream (a transition links a photo to the one taken before it), so it
comes from the clock when every photo has one: EXIF DateTimeOriginal, else DateTime, or a flight
log's time column. When any photo lacks a time the whole flight is ordered by file name (camera
counters), because mixing clock and name order would put an untimed photo anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_backend.core.errors import InputError
from model_backend.geo.exif import PhotoPriors, read_priors, read_visloc_log
from model_backend.locate.outputs import OUTPUT_SUFFIXES

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
OWN_OUTPUTS = tuple(s for s in OUTPUT_SUFFIXES if s.endswith(PHOTO_SUFFIXES))
"""Locate's own rasters: never photos, though a flight's outputs may be written into its photo folder."""


@dataclass(frozen=True)
class FlightPhoto:
    path: str
    priors: PhotoPriors
    """EXIF (or the flight log's row, which overrides it)."""

    @property
    def taken_s(self) -> float | None:
        return self.priors.taken_s


def list_photos(sources: list[str] | tuple[str, ...]) -> list[str]:
    """Photo files from folders (their images, not recursive) and files, each once."""
    out: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out += sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in PHOTO_SUFFIXES
                          and not q.name.startswith(".") and not q.name.lower().endswith(OWN_OUTPUTS))
        elif p.is_file():
            out.append(str(p))
        else:
            raise InputError(f"{p} is neither a photo nor a folder of photos; check the path.")
    out = list(dict.fromkeys(out))
    if not out:
        raise InputError(f"No photos ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(sources)}; choose the flight's "
                         "folder or its photos.")
    return out


def order_flight(sources: list[str] | tuple[str, ...], log: str | None = None) -> tuple[list[FlightPhoto], str]:
    """The flight's photos in the order they were taken, and how that order was found ('time' or 'name')."""
    paths = list_photos(sources)
    rows = read_visloc_log(log) if log else {}
    photos = []
    for p in paths:
        pri = read_priors(p)
        row = rows.get(Path(p).name)
        if row is not None:
            pri = PhotoPriors(**{**pri.__dict__, **{k: v for k, v in row.__dict__.items() if v is not None}})
        photos.append(FlightPhoto(p, pri))
    if all(ph.taken_s is not None for ph in photos):
        return sorted(photos, key=lambda ph: (ph.taken_s, Path(ph.path).name)), "time"
    return sorted(photos, key=lambda ph: (Path(ph.path).name.lower(), ph.path)), "name"
