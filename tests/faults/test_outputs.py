"""Results are never lost or mixed: same-named photos, full disks, stale files of an earlier run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from .conftest import FOOTPRINT, RASTER, json_lines, one_line_error, run_cli


def test_photos_with_one_name_in_two_flights_keep_their_own_results(photo: Path, tmp_path: Path) -> None:
    """DJI cameras restart numbering in every flight folder; photo.jpg may sit beside photo.png."""
    photos = []
    for folder in ("flight1", "flight2"):
        (tmp_path / folder).mkdir()
        photos.append(shutil.copyfile(photo, tmp_path / folder / photo.name))
    Image.open(photo).save(tmp_path / "flight2" / "DJI_0001.png")
    photos.append(tmp_path / "flight2" / "DJI_0001.png")
    out = tmp_path / "out"
    proc = run_cli("locate", RASTER, *photos, "--out", out, "--footprint-m", FOOTPRINT, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert [Path(line["photo"]) for line in lines] == photos
    for key in ("heatmap", "geojson", "gpkg"):
        paths = [line[key] for line in lines]
        assert len(set(paths)) == 3 and all(Path(p).is_file() for p in paths), paths
    for line, p in zip(lines, photos):  # each set says which photo it belongs to, by its full path
        doc = json.loads(Path(line["geojson"]).read_text())
        assert {f["properties"]["photo"] for f in doc["features"]} == {str(p.absolute())}
    assert not list(out.glob(".*"))  # no staging folder left behind


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 6 MB file system (tmpfs) when this machine lets the test mount one; else skipped with the reason."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]}); "
                    "test_a_failed_write_keeps_the_previous_set covers the same path by injection")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_full_disk_says_so_in_one_line_and_keeps_the_previous_results(photo: Path, tmp_path: Path,
                                                                        small_disk: Path) -> None:
    out = small_disk / "results"
    cache = tmp_path / "cache"  # the index lives elsewhere: only the results folder is full
    first = run_cli("locate", RASTER, photo, "--out", out, "--footprint-m", FOOTPRINT, cache=cache)
    assert first.returncode == 0, first.stderr
    before = _digests(out)
    assert set(before) >= {"DJI_0001.heatmap.tif", "DJI_0001.matches.geojson", "DJI_0001.matches.gpkg"}
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave a few kilobytes: enough to start, not to finish
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    filler.write_bytes(filler.read_bytes()[:-(48 << 10)])
    second = run_cli("locate", RASTER, photo, "--out", out, "--footprint-m", FOOTPRINT, "--top-k", 3, cache=cache)
    one_line_error(second, "not enough space", str(out))
    assert _digests(out) == before  # the earlier run's set, whole and unmixed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_write_keeps_the_previous_set(tmp_path: Path) -> None:
    """The same path without a mount: the third file of a set fails to write with ENOSPC."""
    import errno

    from model_backend.core.errors import InputError
    from model_backend.locate.outputs import output_set

    out = tmp_path / "results"
    out.mkdir()
    for suffix in (".heatmap.tif", ".matches.geojson", ".matches.gpkg", ".draped.tif"):
        (out / f"p{suffix}").write_text(f"old {suffix}")
    before = _digests(out)
    with pytest.raises(InputError, match="Not enough space"), output_set(out, "p", need_bytes=1 << 20) as staged:
        (staged / "p.heatmap.tif").write_text("new heatmap")
        (staged / "p.matches.geojson").write_text("new geojson")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert _digests(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    with output_set(out, "p") as staged:  # a run that succeeds without a draped photo drops the stale one
        for suffix in (".heatmap.tif", ".matches.geojson", ".matches.gpkg"):
            (staged / f"p{suffix}").write_text(f"new {suffix}")
    assert sorted(p.name for p in out.iterdir()) == ["p.heatmap.tif", "p.matches.geojson", "p.matches.gpkg"]
    assert (out / "p.heatmap.tif").read_text() == "new .heatmap.tif"


def test_a_full_cache_says_so_instead_of_falling_back_slowly(tmp_path: Path, small_disk: Path) -> None:
    """With the cache on a full disk the ONNX export failed silently and indexing fell back to PyTorch
    (8x slower) before crashing; now the first write that cannot fit says where and how much."""
    cache = small_disk / "cache"  # the export too goes to the full disk, as it does for a user
    proc = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, cache=cache,
                   env={"CDIKT_RUNTIMES_DIR": str(cache / "runtimes")})
    one_line_error(proc, "not enough space", str(cache))
