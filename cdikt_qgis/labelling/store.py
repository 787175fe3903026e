"""The labels of a project: one GeoPackage, rewritten (atomically) on every edit, shown as a layer.

The file is the truth, not the layer or the dialog: every edit is written at once through
`model_backend.learn.labels` (the schema the `adapt` command reads), so labels survive a QGIS crash, a
plugin reload or a closed dialog, and a failed write (disk full, file locked) changes nothing —
the edit is undone in memory and the old file stays whole. The file sits next to the project
(`<project>_cdikt_labels.gpkg`), or in the user data folder while the project is unsaved.

A label is found by its photo's path first, then by the photo's content (sha256, stored in the
file's `photo_sha256` field): analysts move and rename photo folders, and a label keyed by path
alone would then read "not labelled" although the work is done. Files written before that field
existed read with an empty hash and gain the hashes on their next save.

Map clicks arrive in the canvas CRS; they are transformed with QGIS (which knows every CRS the
canvas can show, custom ones included) into the labels' CRS — the raster's, chosen when the
first label is made — and the footprint square is computed there in ground metres.
"""

from __future__ import annotations

import copy
import logging
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsFillSymbol,
    QgsPalLayerSettings,
    QgsPointXY,
    QgsProject,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtGui import QColor

log = logging.getLogger(__name__)

LABELS_PROPERTY = "cdikt/labels_path"
"""Custom layer property marking the project layer that shows a labels file."""
LAYER_NAME = "CDIKT labelled pairs"
LABEL_COLOUR = "#00c2ff"
MAX_UNDO = 100


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors an edit or a read fails with because of its input or the disk, not because of a bug.

    A locked or full disk (OSError), a photo or value that cannot be used (ValueError, the
    engine's CdiktError) and a point the CRSs cannot convert (QgsCsException) are told to the
    analyst in one line; anything else is a bug and also gets its traceback logged. A function,
    so the engine is imported only once an error is being handled.
    """
    from model_backend.core.errors import CdiktError

    return (OSError, ValueError, CdiktError, QgsCsException)


def default_labels_path(project: QgsProject, data_dir: str) -> Path:
    """Beside the saved project, else in the user data folder (an unsaved project has no folder)."""
    if project.fileName():
        return Path(project.absolutePath()) / f"{project.baseName()}_cdikt_labels.gpkg"
    return Path(data_dir) / "labels" / "unsaved_project_labels.gpkg"


class LabelStore(QObject):
    """Labels of one file with undo; `changed` fires after every successful edit (and after undo)."""

    changed = pyqtSignal()

    def __init__(self, path: str | Path, project: QgsProject | None = None) -> None:
        super().__init__()
        from model_backend.learn.labels import WGS84_WKT, LabelSet, read_labels

        self.path = Path(path)
        self.project = project or QgsProject.instance()
        if self.path.exists():
            self.labels = read_labels(self.path)
        else:
            self.labels = LabelSet([], WGS84_WKT, str(self.path))
        self._undo: list[tuple[list, str]] = []
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def crs(self) -> QgsCoordinateReferenceSystem:
        return QgsCoordinateReferenceSystem.fromWkt(self.labels.crs_wkt)

    def __len__(self) -> int:
        return len(self.labels.labels)

    def index_of(self, photo: str | Path) -> int | None:
        """The label of `photo`: the one stored under its path, else the one of a photo with the same bytes.

        The content match is what keeps a moved or renamed photo folder "labelled"; it hashes the
        photo only when some label could be of it (see `_content_keys`), and hashes are cached.
        """
        want = Path(photo).absolute()
        for i, lb in enumerate(self.labels.labels):
            if self.labels.photo_path(lb).absolute() == want:
                return i
        return self._index_by_content(want)

    def is_labelled(self, photo: str | Path) -> bool:
        return self.index_of(photo) is not None

    def labelled_among(self, photos: Iterable[str | Path]) -> set[Path]:
        """Which of `photos` (absolute paths) have a label, by path or by content, as `index_of` decides.

        One pass for a folder's worth of photos: each label's photo is looked at once, not once
        per listed photo, since the dialog asks again after every edit.
        """
        wanted = [Path(p).absolute() for p in photos]
        stored = self.labelled_photos()
        found = {p for p in wanted if p in stored}
        by_content = self._content_keys()
        for p in wanted:
            if p in found:
                continue
            key = _file_key(p)
            hashes = {h for _, h, size in by_content if size is None or size == key[0]} if key else set()
            if hashes and self.photo_hash(p) in hashes:
                found.add(p)
        return found

    def labelled_photos(self) -> set[Path]:
        """The paths stored in the file (a moved photo is not among them; `labelled_among` finds it)."""
        return {self.labels.photo_path(lb).absolute() for lb in self.labels.labels}

    def photo_hash(self, photo: str | Path) -> str | None:
        """sha256 of the photo's bytes, None when it cannot be read; cached until its size or mtime changes."""
        p = Path(photo).absolute()
        key = _file_key(p)
        if key is None:
            return None
        cached = self._hashes.get(p)
        if cached is not None and cached[0] == key:
            return cached[1]
        from model_backend.core.checksums import sha256_file

        try:
            digest = sha256_file(p)
        except OSError as exc:  # unreadable now (permissions, a network drive gone): not labelled, not an error
            log.info("Cannot hash %s: %s", p, exc)
            return None
        self._hashes[p] = (key, digest)
        return digest

    def _content_keys(self) -> list[tuple[int, str, int | None]]:
        """(index, hash, size of the photo where the label says, None when gone) of every label with a hash.

        Identical bytes mean identical sizes, so a photo is hashed only against labels whose photo
        is gone (size unknown: the folder moved) or is as large: a folder is not hashed against the
        labels of other flights whose photos are still in place.
        """
        out = []
        for i, lb in enumerate(self.labels.labels):
            if lb.photo_sha256:
                key = _file_key(self.labels.photo_path(lb))
                out.append((i, lb.photo_sha256, key[0] if key else None))
        return out

    def _index_by_content(self, photo: Path) -> int | None:
        key = _file_key(photo)
        if key is None:
            return None
        candidates = [(i, h) for i, h, size in self._content_keys() if size is None or size == key[0]]
        if not candidates:
            return None
        digest = self.photo_hash(photo)
        return next((i for i, h in candidates if h == digest), None)

    def footprint(self, i: int) -> tuple[float, float, float, float | None]:
        """(cx, cy, side_m, heading) of label i in the labels' CRS."""
        from model_backend.learn.labels import ring_centre, ring_side_m

        lb = self.labels.labels[i]
        cx, cy = ring_centre(lb.ring)
        return cx, cy, ring_side_m(lb.ring, self.labels.crs_wkt), lb.heading

    # -- edits (each one saved at once) ------------------------------------------------------
    def _edit(self, change: Callable[[], None]) -> None:
        snapshot = (copy.deepcopy(self.labels.labels), self.labels.crs_wkt)
        try:
            change()
            self._fill_missing_hashes()
            self.save()
        except BaseException:
            self.labels.labels, self.labels.crs_wkt = snapshot
            raise
        self._undo.append(snapshot)
        del self._undo[:-MAX_UNDO]
        self.changed.emit()

    def _fill_missing_hashes(self) -> None:
        """Give labels from older files their photo's hash while the photo is still where the label says.

        Done on an edit, when the file is rewritten anyway, so opening an old file costs nothing
        and its labels keep being found after the folder moves. A photo already gone stays unhashed.
        """
        for lb in self.labels.labels:
            if not lb.photo_sha256:
                lb.photo_sha256 = self.photo_hash(self.labels.photo_path(lb)) or ""

    def save(self) -> None:
        from model_backend.learn.labels import write_labels

        write_labels(self.path, self.labels)
        layer = self.find_layer()
        if layer is not None:
            layer.dataProvider().reloadData()
            layer.triggerRepaint()

    def to_labels_crs(self, point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> QgsPointXY:
        if not crs.isValid() or crs == self.crs:
            return QgsPointXY(point)
        return QgsCoordinateTransform(crs, self.crs, self.project).transform(point)

    def place(self, photo: str | Path, point: QgsPointXY, point_crs: QgsCoordinateReferenceSystem, side_m: float,
              heading: float | None, raster_crs: QgsCoordinateReferenceSystem | None = None) -> int:
        """Label `photo` at `point` (in `point_crs`), or move its label there; returns the label's index.

        The first label fixes the file's CRS to `raster_crs` (the raster being labelled). A label
        found by content (the photo moved) is relinked to the photo's new path, so `adapt` finds it.
        """
        from model_backend.learn.labels import Label, now_iso, square_footprint

        def change() -> None:
            if not self.labels.labels and raster_crs is not None and raster_crs.isValid():
                self.labels.crs_wkt = raster_crs.toWkt()
            p = self.to_labels_crs(point, point_crs)
            ring = square_footprint(p.x(), p.y(), side_m, heading, self.labels.crs_wkt)
            i = self.index_of(photo)
            if i is None:
                self.labels.labels.append(Label(photo=self.labels.stored_photo(photo), ring=ring, heading=heading,
                                                photo_sha256=self._hash_or_raise(photo)))
            else:
                lb = self.labels.labels[i]
                lb.photo = self.labels.stored_photo(photo)
                lb.ring, lb.heading, lb.edited = ring, heading, now_iso()

        self._edit(change)
        found = self.index_of(photo)
        if found is None:  # the edit just stored it: not finding it is a bug, never the user's input
            raise RuntimeError(f"the label of {photo} was saved but cannot be found again")
        return found

    def _hash_or_raise(self, photo: str | Path) -> str:
        """A new label needs its photo's hash; an unreadable photo is the analyst's to fix, not a bug."""
        digest = self.photo_hash(photo)
        if digest is None:
            raise OSError(f"Photo {Path(photo).name} cannot be read at {Path(photo).absolute()}; check the file.")
        return digest

    def reshape(self, i: int, side_m: float | None = None, heading: float | None = None,
                set_heading: bool = False, photo: str | Path | None = None) -> None:
        """Resize (`side_m`) and/or rotate (`heading` when `set_heading`) label i about its centre.

        `photo`: where the analyst sees the label's photo now; a label found by content is relinked there.
        """
        from model_backend.learn.labels import now_iso, square_footprint

        cx, cy, side, old_heading = self.footprint(i)

        def change() -> None:
            lb = self.labels.labels[i]
            if photo is not None:
                lb.photo = self.labels.stored_photo(photo)
            new_heading = heading if set_heading else old_heading
            lb.ring = square_footprint(cx, cy, side_m or side, new_heading, self.labels.crs_wkt)
            lb.heading, lb.edited = new_heading, now_iso()

        self._edit(change)

    def delete(self, i: int) -> None:
        self._edit(lambda: self.labels.labels.pop(i))

    def undo(self) -> bool:
        """Back to the state before the last edit (saved too); False when there is nothing to undo."""
        if not self._undo:
            return False
        current = (copy.deepcopy(self.labels.labels), self.labels.crs_wkt)
        self.labels.labels, self.labels.crs_wkt = self._undo.pop()
        try:
            self.save()
        except BaseException:
            self._undo.append((self.labels.labels, self.labels.crs_wkt))
            self.labels.labels, self.labels.crs_wkt = current
            raise
        self.changed.emit()
        return True

    # -- the map layer -----------------------------------------------------------------------
    def find_layer(self) -> QgsVectorLayer | None:
        for layer in self.project.mapLayers().values():
            if layer.customProperty(LABELS_PROPERTY) == str(self.path):
                return layer
        return None

    def ensure_layer(self) -> QgsVectorLayer | None:
        """The project layer showing this file (added and styled once; reused after a plugin reload)."""
        layer = self.find_layer()
        if layer is not None or not self.path.exists():
            return layer
        layer = QgsVectorLayer(f"{self.path}|layername=labels", LAYER_NAME, "ogr")
        if not layer.isValid():
            log.warning("QGIS cannot open the labels file %s", self.path)
            return None
        layer.setCustomProperty(LABELS_PROPERTY, str(self.path))
        style_labels(layer)
        self.project.addMapLayer(layer)
        return layer


def _file_key(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file, None when it is missing or not a file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def style_labels(layer: QgsVectorLayer) -> None:
    """Cyan outline, light fill, labelled with the photo's file name."""
    symbol = QgsFillSymbol.createSimple({"color": "0,194,255,40", "outline_color": LABEL_COLOUR,
                                         "outline_width": "0.7", "outline_width_unit": "MM"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    text = QgsTextFormat()
    text.setSize(9)
    text.setColor(QColor(LABEL_COLOUR))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setColor(QColor("black"))
    text.setBuffer(buffer)
    pal = QgsPalLayerSettings()
    pal.fieldName = "regexp_substr(\"photo\", '[^/\\\\\\\\]+$')"
    pal.isExpression = True
    pal.setFormat(text)
    pal.placement = QgsPalLayerSettings.OverPoint
    layer.setLabeling(QgsVectorLayerSimpleLabeling(pal))
    layer.setLabelsEnabled(True)
