"""A photo's results appear as one set: every file of a run, or the previous run's, never a mix.

A locate writes a heatmap, the matches as GeoJSON and GeoPackage, and sometimes the draped
photo. Written one by one into the results folder, a failure halfway (a full disk, a cancel)
left the new heatmap beside the old GeoPackage, which QGIS would happily show together. So
the set is written into a hidden folder beside the results and moved into place only when all
of it is written; renames within one file system need no space and cannot fail halfway through
a file. A file of the old set that the new run did not produce (a draped photo of an earlier,
verified run) is removed, so no stale result stays under the new run's name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model_backend.core.atomic import sweep_stale
from model_backend.core.errors import InputError
from model_backend.core.space import disk_full, no_space_error

OUTPUT_SUFFIXES = (".heatmap.tif", ".matches.geojson", ".matches.gpkg", ".draped.tif")
"""Every file a locate writes for one photo, after its output name."""


@contextmanager
def output_set(folder: Path, name: str, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a staging folder to write `<name><suffix>` files into; publish them together on success.

    `need_bytes`: about what the set takes, for the message when the disk is full. A write that
    fails for lack of space (an OSError, or GDAL/OGR's bare RuntimeError) becomes one InputError
    naming the folder and the space needed; the previous set stays as it was.
    """
    sweep_stale(folder, f".{name}.", ".partial")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder))
    except OSError as exc:
        raise no_space_error(folder, need_bytes) if disk_full(exc, folder) else InputError(
            f"Cannot write in {folder} ({exc.strerror}); choose another output folder.") from None
    try:
        try:
            yield staging
        except (OSError, RuntimeError) as exc:
            if disk_full(exc, folder):
                raise no_space_error(folder, need_bytes) from None
            raise
        written = {s for s in OUTPUT_SUFFIXES if (staging / f"{name}{s}").is_file()}
        for suffix in OUTPUT_SUFFIXES:
            target = folder / f"{name}{suffix}"
            if suffix in written:
                _publish(staging / f"{name}{suffix}", target)
            else:
                target.unlink(missing_ok=True)
                Path(f"{target}.aux.xml").unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(src: Path, target: Path) -> None:
    try:
        os.replace(src, target)
        sidecar = Path(f"{src}.aux.xml")
        if sidecar.exists():
            os.replace(sidecar, f"{target}.aux.xml")
        else:
            Path(f"{target}.aux.xml").unlink(missing_ok=True)  # stale statistics of the old file
    except OSError as exc:
        raise InputError(f"Cannot replace {target} ({exc.strerror}); close it in other programs or "
                         "pick another output folder.") from None
