"""Malformed input gives one line that says what to fix: label files, rasters, the environment, adapt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import FOOTPRINT, RASTER, one_line_error, run_cli

POLYGON = [[121.0, 14.0], [121.001, 14.0], [121.001, 14.001], [121.0, 14.001], [121.0, 14.0]]


def _collection(features) -> dict:
    return {"type": "FeatureCollection", "features": features}


def _feature(coords, props=None) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"photo": "a.jpg"} if props is None else props}


LABEL_FILES = {
    "string coordinates": (_collection([_feature([[["a", "b"], ["c", "d"], ["e", "f"], ["a", "b"]]])]),
                           "not pairs of numbers"),
    "short coordinates": (_collection([_feature([[[121.0], [121.1], [121.2], [121.0]]])]), "not pairs of numbers"),
    "features as a string": (_collection("polygons here"), "not a list"),
    "a feature as a number": (_collection([5]), "not a polygon"),
    "properties as a list": (_collection([_feature([POLYGON], ["photo"])]), "properties"),
    "an infinite corner": (_collection([_feature([[*POLYGON[:2], [float("inf"), 14.0], POLYGON[0]]])]),
                           "finite"),
    "not a FeatureCollection": ({"type": "Feature"}, "featurecollection"),
}


@pytest.mark.parametrize("case", list(LABEL_FILES))
def test_malformed_label_files_are_refused_in_one_line(case: str, tmp_path: Path) -> None:
    from model_backend.core.errors import InputError
    from model_backend.learn.labels import read_labels

    doc, phrase = LABEL_FILES[case]
    path = tmp_path / "labels.geojson"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as info:
        read_labels(path)
    assert phrase.lower() in str(info.value).lower() and "\n" not in str(info.value)


def test_a_text_file_named_gpkg_is_refused(tmp_path: Path) -> None:
    from model_backend.core.errors import InputError
    from model_backend.learn.labels import read_labels

    fake = tmp_path / "labels.gpkg"
    fake.write_text("these are my labels\n")
    with pytest.raises(InputError, match="not a readable GeoPackage"):
        read_labels(fake)


def test_a_stray_world_size_runs_as_one_process(tmp_path: Path) -> None:
    proc = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, "--runtime", "torch", cache=tmp_path / "cache",
                   env={"WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not started by torchrun" in proc.stderr and "Traceback" not in proc.stderr


def test_a_rank_that_cannot_reach_rank_0_says_so(tmp_path: Path) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9",
           "CDIKT_DIST_CONNECT_S": "2"}
    proc = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, "--device", "cpu", cache=tmp_path / "cache",
                   env=env, timeout=120)
    one_line_error(proc, "cannot reach rank 0", "127.0.0.1:9")


def test_a_truncated_raster_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "truncated.tif"
    data = RASTER.read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    proc = run_cli("index", broken, "--footprint-m", FOOTPRINT, "--runtime", "torch", cache=tmp_path / "cache")
    one_line_error(proc, "truncated.tif")


@pytest.fixture()
def labelled(tmp_path: Path) -> dict:
    """Three photos cut from the raster and labelled at their footprints (with their content checksums)."""
    path = make_labels(tmp_path)
    return {"labels": path, "photos": sorted((tmp_path / "photos").glob("p*.jpg"))}


def make_labels(tmp_path: Path) -> Path:
    """Three photos cut from the raster, labelled at their footprints; returns the labels GeoPackage."""
    from model_backend.core.checksums import sha256_file
    from model_backend.geo.raster import open_raster
    from model_backend.learn.datasets.synth import make_views, save_view
    from model_backend.learn.labels import Label, LabelSet, write_labels

    info = open_raster(str(RASTER))
    labels = []
    for i, view in enumerate(make_views(str(RASTER), 3, FOOTPRINT, 7, max_tilt_deg=0.0)):
        p = tmp_path / "photos" / f"p{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        save_view(view, str(p))
        s = view.spec
        h = FOOTPRINT / 2
        ring = [(s.cx + dx * h, s.cy + dy * h) for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1))]
        labels.append(Label(photo=str(p), ring=ring, heading=None, photo_sha256=sha256_file(p)))
    return Path(write_labels(tmp_path / "labels.gpkg", LabelSet(labels, info.crs_wkt, str(tmp_path / "labels.gpkg"))))


def test_adapt_refuses_a_replaced_photo_before_training(labelled: dict, tmp_path: Path) -> None:
    shutil.copyfile(labelled["photos"][1], labelled["photos"][0])  # the first label now shows the wrong place
    proc = run_cli("adapt", "--raster", RASTER, "--labels", labelled["labels"], "--out", tmp_path / "new.safetensors",
                   cache=tmp_path / "cache", timeout=120)
    one_line_error(proc, "label 1", "not the photo that was labelled")
    assert not (tmp_path / "new.safetensors").exists()


def test_adapt_refuses_an_unreadable_registry_before_training(labelled: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "registry.json").write_text("{ broken")
    proc = run_cli("adapt", "--raster", RASTER, "--labels", labelled["labels"], "--out", tmp_path / "new.safetensors",
                   cache=tmp_path / "cache", env={"CDIKT_DATA_DIR": str(data)}, timeout=120)
    one_line_error(proc, "registry", "unreadable")
    assert not (tmp_path / "new.safetensors").exists()


@pytest.mark.parametrize("size, fill, phrase", [((1, 1), (120, 80, 40), "too small"),
                                                ((640, 480), (0, 0, 0), "blank"),
                                                ((640, 480), (90, 120, 60), "blank")])
def test_a_photo_with_nothing_to_match_is_refused(size, fill, phrase, tmp_path: Path) -> None:
    """Any image gets a best tile: a 1 x 1 or one-colour photo was "located" with a score of 0.7."""
    from PIL import Image

    photo = tmp_path / "empty.png"
    Image.new("RGB", size, fill).save(photo)
    proc = run_cli("locate", RASTER, photo, "--out", tmp_path / "out", "--footprint-m", FOOTPRINT,
                   cache=tmp_path / "cache")
    one_line_error(proc, "empty.png", phrase)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_huge_photo_is_decoded_small(tmp_path: Path) -> None:
    """A 13000 x 13000 PNG of a few hundred KB: used at 6000 px at most (it took 3 GB, now under 1 GB)."""
    import numpy as np
    from PIL import Image

    from model_backend.geo.exif import MAX_PHOTO_SIDE, load_photo

    pixels = np.zeros((13000, 13000, 3), np.uint8)
    pixels[::97, :, 0] = 255
    Image.fromarray(pixels).save(tmp_path / "big.png")
    del pixels
    image = load_photo(str(tmp_path / "big.png"))
    assert max(image.shape[:2]) <= MAX_PHOTO_SIDE and image.shape[0] == image.shape[1]


def _with_relative_altitude(src: Path, dst: Path, metres: str) -> Path:
    """A copy of a real DJI photo (its EXIF: FC350, 3.61 mm) with a DJI XMP packet giving its height."""
    import struct

    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description drone-dji:RelativeAltitude="{metres}"/>'
           "</x:xmpmeta>").encode()
    data = src.read_bytes()
    dst.write_bytes(data[:2] + b"\xff\xfe" + struct.pack(">H", len(xmp) + 2) + xmp + data[2:])  # a COM segment
    return dst


@pytest.mark.parametrize("metres, source", [("+5000.0", "scale search"), ("+900000000", "scale search"),
                                            ("+30.0", "exif")])
def test_an_absurd_exif_altitude_is_ignored_not_fatal(metres: str, source: str, tmp_path: Path) -> None:
    """A broken height tag gave a footprint of kilometres and the photo was dropped; now the prior is
    ignored (with a warning) and the scale search runs. A plausible height still sets the footprint."""
    from model_backend.core.config import QueryConfig, TilingConfig
    from model_backend.geo.exif import read_priors
    from model_backend.geo.raster import open_raster
    from model_backend.locate.pipeline import choose_footprints

    from .conftest import DATA

    photo = _with_relative_altitude(DATA / "DJI_0061.JPG", tmp_path / "DJI_0061.JPG", metres)
    assert read_priors(str(photo)).relative_altitude_m == float(metres)
    info = open_raster(str(RASTER))
    sizes, chosen, _ = choose_footprints(info, str(photo), TilingConfig(footprint_m=FOOTPRINT), QueryConfig())
    assert chosen == source
    assert all(0 < s <= 0.95 * min(info.width_m, info.height_m) for s in sizes)


def test_output_names_are_distinct_and_recognisable() -> None:
    from model_backend.core.paths import output_names

    names = output_names(["f1/DJI_0001.JPG", "f2/DJI_0001.JPG", "f2/DJI_0001.png", "f3/dji_0001.jpg",
                          "other/view.jpg"])
    assert names == ["f1_DJI_0001_JPG", "f2_DJI_0001_JPG", "f2_DJI_0001_png", "f3_dji_0001_jpg", "view"]
    assert len({n.lower() for n in output_names(["a/x.jpg", "a/x.jpg", "a/x.jpg"])}) == 3


def test_a_lock_held_elsewhere_times_out_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from model_backend.core.errors import InputError
    from model_backend.core.locks import file_lock

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waited = []
        with pytest.raises(InputError, match="Another process has held the model registry"), \
                file_lock(lock, timeout_s=0.5, on_wait=lambda: waited.append(1), what="the model registry"):
            pass
        assert waited == [1]
    finally:
        holder.kill()
        holder.wait()
    with file_lock(lock, timeout_s=0.5):  # released by the OS when its holder died
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rank_0_without_its_peers_says_so(tmp_path: Path) -> None:
    """RANK/MASTER_ADDR set by hand and no second process: it waited 30 minutes in silence."""
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "CDIKT_DIST_CONNECT_S": "3"}
    proc = run_cli("index", RASTER, "--footprint-m", FOOTPRINT, "--device", "cpu", cache=tmp_path / "cache",
                   env=env, timeout=120)
    one_line_error(proc, "no other process joined rank 0", f"127.0.0.1:{port}")


def test_two_processes_started_by_hand_build_one_index(tmp_path: Path) -> None:
    """The same job launched by hand (not torchrun) with all of torchrun's variables: it still works."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "CDIKT_CACHE_DIR": str(tmp_path / "cache"), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CDIKT_CHUNK_TILES": "20"}
        env.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "model_backend", "index", str(RASTER), "--footprint-m",
                                       str(FOOTPRINT), "--device", "cpu", "--runtime", "torch"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert len([f for f in (tmp_path / "cache" / "indexes").iterdir() if (f / "manifest.json").is_file()]) == 1
