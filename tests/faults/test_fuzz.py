"""Seeded fuzzing of the two inputs a user writes by hand: label files and command-line options.

The hand-picked cases in test_malformed.py name the defects the probe found; these draw hundreds
of mutations from a fixed seed (reproducible, so a failure names its case) and hold the one rule
for all of them: the engine answers, or refuses in one line, never with a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
from pathlib import Path

import pytest

from .conftest import RASTER

GOOD_LABELS = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "properties": {"photo": f"p{i}.jpg", "heading": 90.0 * i},
         "geometry": {"type": "Polygon", "coordinates": [[[121.0 + d, 14.0], [121.001 + d, 14.0],
                                                          [121.001 + d, 14.001], [121.0 + d, 14.001],
                                                          [121.0 + d, 14.0]]]}}
        for i, d in enumerate((0.0, 0.002, 0.004))
    ],
}
ODD_VALUES = [None, "", "x", -1, 0, 1e308, -1e308, math.nan, math.inf, [], {}, [[]], [None], True, "121.0",
              [121.0], [[121.0, 14.0]], {"type": "Polygon"}, 10**30]


def _paths(node, prefix=()):
    """Every place in a JSON document a value can be swapped."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        drop = 0.2 if isinstance(parent, dict) else 0.1  # a missing key, or a shorter list
        if rng.random() < drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = rng.choice(ODD_VALUES)
    return doc


def test_mutated_label_files_load_or_are_refused_in_one_line(tmp_path: Path) -> None:
    from model_backend.core.errors import InputError
    from model_backend.learn.labels import read_labels

    rng = random.Random(20261205)
    path = tmp_path / "labels.geojson"
    loaded = refused = 0
    for case in range(400):
        doc = _mutate(GOOD_LABELS, rng)
        path.write_text(json.dumps(doc))  # NaN/inf written as JSON's extensions, as some tools do
        try:
            labels = read_labels(path)
        except InputError as exc:
            assert "\n" not in str(exc) and str(exc), f"case {case}: {doc}"
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"case {case} raised {type(exc).__name__}: {exc}\n{json.dumps(doc)}")
        for label in labels.labels:  # what loads is usable: finite corners, a photo named
            assert label.photo and all(math.isfinite(v) for xy in label.ring for v in xy), f"case {case}"
        loaded += 1
    assert refused > 100 and loaded > 20  # the fuzz reaches both sides of the check


def test_random_bytes_as_a_label_file_are_refused_in_one_line(tmp_path: Path) -> None:
    from model_backend.core.errors import InputError
    from model_backend.learn.labels import read_labels

    rng = random.Random(7)
    for case in range(60):
        suffix = (".geojson", ".gpkg")[case % 2]
        path = tmp_path / f"labels{case}{suffix}"
        good = json.dumps(GOOD_LABELS).encode()
        cut = rng.randrange(len(good))
        path.write_bytes(good[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        with pytest.raises(InputError) as info:
            read_labels(path)
        assert "\n" not in str(info.value), f"case {case}"


NUMBERS = ["-1", "0", "1e13", "1e308", "nan", "inf", "-inf", "3.5", "0.001", "1e-300", "10000000000000", "-0"]
NOT_NUMBERS = ["abc", "", "0x10", "1,5"]
LOCATE_OPTIONS = ["--footprint-m", "--footprint-tolerance", "--top-k", "--rotations", "--prior-radius-m",
                  "--batch-size"]
INDEX_OPTIONS = ["--footprint-m", "--batch-size"]


def _run(argv: list[str]) -> tuple[int, str]:
    from model_backend.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a value that is not a number at all
            code = int(exc.code or 0)
    return code, err.getvalue()


def test_fuzzed_options_are_refused_in_one_line_before_any_work(tmp_path: Path) -> None:
    """Random values for every numeric option of index and locate: each is refused by argparse or in
    one line by the engine before any work (nothing in the cache), or accepted; never a traceback.
    The photo does not exist, so an accepted value ends at that check, which comes before indexing."""
    rng = random.Random(11)
    cache = tmp_path / "cache"
    missing = str(tmp_path / "no_such_photo.jpg")
    for case in range(120):
        command = rng.choice(["index", "locate"])
        options = LOCATE_OPTIONS if command == "locate" else INDEX_OPTIONS
        argv = [command, str(RASTER)] + ([missing, "--out", str(tmp_path / "out")] if command == "locate" else [])
        for flag in rng.sample(options, rng.randint(1, 2)):
            argv += [flag, rng.choice(NUMBERS if rng.random() < 0.9 else NOT_NUMBERS)]
        argv += ["--cache-dir", str(cache), "--device", rng.choice(["cpu"] * 6 + ["bogus", "cuda:x"])]
        if command == "index" and "--device" in argv and argv[-1] == "cpu":
            argv[-1] = "bogus"  # a valid index run would build an index: keep every index case refused
        try:
            code, err = _run(argv)
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"case {case} {argv} raised {type(exc).__name__}: {exc}")
        assert code == 2, f"case {case} {argv}: exit {code}\n{err}"
        lines = [line for line in err.splitlines() if line.startswith("error:") or "error:" in line]
        assert lines and "Traceback" not in err, f"case {case} {argv}\n{err}"
        assert not (cache / "indexes").exists(), f"case {case} {argv}: work started"


def test_a_vrt_whose_source_is_gone_is_one_line(tmp_path: Path) -> None:
    from .conftest import one_line_error, run_cli

    source = tmp_path / "tile.tif"
    source.write_bytes(RASTER.read_bytes())
    from osgeo import gdal

    vrt = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt), [str(source)]).FlushCache()
    source.unlink()
    proc = run_cli("index", vrt, "--footprint-m", 40, "--runtime", "torch", cache=tmp_path / "cache")
    one_line_error(proc, "mosaic.vrt")
