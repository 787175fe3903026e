"""The command line, run for real in a subprocess: results on stdout, one-line errors with status 2.

Runs that load the model cost seconds each, so only four do (index, index again, locate, locate
with bad photos among good ones); every bad-input case fails before the model is loaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from model_backend.learn.datasets.synth import make_views, render_view, save_view

REPO = Path(__file__).resolve().parents[2]
MANILA = "manila_oam_0.10m.tif"
FOOTPRINT = 40.0
JSON_KEYS = {"photo", "best_lon", "best_lat", "best_x", "best_y", "score", "seconds"}


def run_cli(*args: str, cache: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "CDIKT_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "model_backend", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def assert_user_error(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """Status 2, nothing on stdout, one line on stderr naming the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    """A raster, a real photo of it with known truth, and a collection of bad inputs."""
    d = tmp_path_factory.mktemp("cli")
    raster = data_dir / MANILA
    drawn = make_views(str(raster), 1, FOOTPRINT, 0, max_tilt_deg=0.0, photometric=False, scale_range=(1.0, 1.0))[0]
    view = render_view(str(raster), replace(drawn.spec, heading_deg=0.0, tilt_deg=0.0, tilt_azimuth_deg=0.0))
    photo = d / "place.jpg"
    save_view(view, str(photo))
    truncated = d / "truncated.jpg"
    truncated.write_bytes(photo.read_bytes()[:4000])  # a JPEG header, then nothing to decode
    text = d / "notes.txt"
    text.write_text("not a raster\n")
    fake_jpg = d / "x.jpg"
    fake_jpg.write_text("not a photo either\n")
    no_crs = d / "no_crs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       transform=from_origin(500000.0, 1600000.0, 0.1, 0.1)) as ds:
        ds.write(np.full((3, 64, 64), 120, np.uint8))
    junk = d / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"raster": raster, "photo": photo,
            "truncated": truncated, "text": text, "fake_jpg": fake_jpg, "no_crs": no_crs, "junk": junk,
            "dir": d, "cache": d / "cache"}


def test_help_lists_commands_and_options() -> None:
    top = subprocess.run([sys.executable, "-m", "model_backend", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert top.returncode == 0 and "index" in top.stdout and "locate" in top.stdout
    loc = subprocess.run([sys.executable, "-m", "model_backend", "locate", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert loc.returncode == 0
    for option in ("--out", "--footprint-m", "--top-k", "--rotations", "--weights", "--device", "--batch-size",
                   "--stride", "--cache-dir", "PHOTO"):
        assert option in loc.stdout, option


def test_index_prints_json_and_is_reused(work: dict[str, Path]) -> None:
    first = run_cli("index", work["raster"], "--footprint-m", FOOTPRINT, cache=work["cache"])
    assert first.returncode == 0, first.stderr
    (info,) = json_lines(first.stdout)
    folder = Path(info["index"])
    assert folder.parent == work["cache"] / "indexes"          # CDIKT_CACHE_DIR is honoured
    assert info["tiles"] > 0 and info["footprint_m"] == FOOTPRINT and info["raster"] == str(work["raster"])
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "manifest.json", folder / "embeddings.npy")}
    again = run_cli("index", work["raster"], "--footprint-m", FOOTPRINT, cache=work["cache"])
    assert again.returncode == 0, again.stderr
    (info2,) = json_lines(again.stdout)
    assert info2["index"] == info["index"] and info2["tiles"] == info["tiles"]
    # Reused, not rebuilt: nothing in the index folder was rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "manifest.json", folder / "embeddings.npy")} == stamps


def test_index_ann_builds_a_compressed_index_on_request_and_reuses_it(work: dict[str, Path]) -> None:
    """`--ann on` adds the IVF-PQ index beside the embeddings (auto would wait for 10^6 tiles); a small index
    gets a one-line refusal, not a crash."""
    small = run_cli("index", work["raster"], "--footprint-m", FOOTPRINT, "--ann", "on", cache=work["cache"])
    assert_user_error(small, "at least 256", "exact search is fast")
    first = run_cli("index", work["raster"], "--footprint-m", 16, "--ann", "on", cache=work["cache"])
    assert first.returncode == 0, first.stderr
    (info,) = json_lines(first.stdout)
    assert info["tiles"] >= 256 and info["ann"] == str(Path(info["index"]) / "ann.faiss")
    stamp = Path(info["ann"]).stat().st_mtime_ns
    again = run_cli("index", work["raster"], "--footprint-m", 16, "--ann", "on", cache=work["cache"])
    (info2,) = json_lines(again.stdout)
    assert info2["ann"] == info["ann"] and Path(info["ann"]).stat().st_mtime_ns == stamp  # reused
    off = run_cli("index", work["raster"], "--footprint-m", 16, "--ann", "off", cache=work["cache"])
    assert json_lines(off.stdout)[0]["ann"] is None


def test_locate_prints_json_and_writes_outputs(work: dict[str, Path]) -> None:
    out = work["dir"] / "out"
    proc = run_cli("locate", work["raster"], work["photo"], "--out", out, "--footprint-m", FOOTPRINT,
                   "--footprint-tolerance", 0.25, "--top-k", 3, cache=work["cache"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = json_lines(proc.stdout)
    assert set(line) >= JSON_KEYS
    assert line["photo"] == str(work["photo"]) and line["footprint_source"] == "user" and line["candidates"] == 3
    # the sizes around the one given, each with its best score; the one used is the best-scoring
    tried = line["footprints_tried"]
    assert [f for f, _ in tried] == [round(FOOTPRINT / 1.25, 2), FOOTPRINT, round(FOOTPRINT * 1.25, 2)]
    assert line["footprint_given_m"] == FOOTPRINT and line["footprint_m"] == max(tried, key=lambda t: t[1])[0]
    assert -1.0 <= line["score"] <= 1.0 and line["seconds"] > 0
    assert -180 <= line["best_lon"] <= 180 and -90 <= line["best_lat"] <= 90
    spec = json.loads((work["dir"] / "place.truth.json").read_text())["spec"]  # written by save_view
    cx, cy = spec["cx"], spec["cy"]
    assert math.hypot(line["best_x"] - cx, line["best_y"] - cy) <= FOOTPRINT
    for suffix in (".heatmap.tif", ".matches.geojson", ".matches.gpkg"):
        assert (out / f"place{suffix}").is_file(), suffix
    assert Path(line["heatmap"]) == (out / "place.heatmap.tif").absolute()
    gj = json.loads((out / "place.matches.geojson").read_text())
    assert len(gj["features"]) == 3


def test_a_minimal_environment_prints_nothing_on_stderr(work: dict[str, Path], tmp_path: Path) -> None:
    """As `env -i` on a fresh machine: no `proj` executable, no PROJ_DATA, no HOME settings.

    pyproj inside a venv finds PROJ's data only through the venv (setup links it); a machine with
    Debian's proj-bin hid the missing link, and every command warned on stderr.
    """
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {"PATH": str(empty_bin), "HOME": str(tmp_path / "home"), "CDIKT_CACHE_DIR": str(work["cache"]),
           "GDAL_PAM_ENABLED": "NO"}
    proc = subprocess.run([sys.executable, "-m", "model_backend", "locate", str(work["raster"]), str(work["photo"]),
                           "--out", str(tmp_path / "out"), "--footprint-m", str(FOOTPRINT), "--top-k", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    (line,) = json_lines(proc.stdout)
    assert line["candidates"] == 2


def test_bad_photos_do_not_stop_good_ones(work: dict[str, Path]) -> None:
    out = work["dir"] / "out_mixed"
    missing = work["dir"] / "missing.jpg"
    proc = run_cli("locate", work["raster"], missing, work["photo"], work["truncated"], "--out", out,
                   "--footprint-m", FOOTPRINT, "--top-k", 1, "--rotations", 1, cache=work["cache"])
    assert proc.returncode == 2
    (line,) = json_lines(proc.stdout)
    assert line["photo"] == str(work["photo"])
    errors = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(errors) == 2, proc.stderr
    assert all(e.startswith("error: ") for e in errors)
    assert any(str(missing) in e and "not found" in e for e in errors)            # caught before the model
    assert any("truncated.jpg" in e and "damaged or truncated" in e for e in errors)  # caught while decoding
    assert (out / "place.heatmap.tif").is_file() and not (out / "truncated.heatmap.tif").exists()


BAD_INPUTS = {
    # id: (arguments with {placeholders}, phrases the one-line message must contain)
    "missing raster": (["locate", "{dir}/nope.tif", "{photo}"], ["not found", "check the path"]),
    "folder as raster": (["locate", "{dir}", "{photo}"], ["is a folder", "pick a geotiff"]),
    "text file as raster": (["locate", "{text}", "{photo}"], ["not a raster", "pick a geotiff"]),
    "raster without crs": (["locate", "{no_crs}", "{photo}"], ["no coordinate reference system", "assign"]),
    "photo missing": (["locate", "{raster}", "{dir}/nope.jpg"], ["photo not found", "check the path"]),
    "photo not an image": (["locate", "{raster}", "{fake_jpg}"], ["x.jpg is not an image", "pick a jpeg"]),
    "footprint larger than raster": (["locate", "{raster}", "{photo}", "--footprint-m", "5000"],
                                     ["larger than the raster", "smaller --footprint-m"]),
    "negative footprint": (["locate", "{raster}", "{photo}", "--footprint-m", "-5"], ["--footprint-m", "positive"]),
    "top-k 0": (["locate", "{raster}", "{photo}", "--top-k", "0"], ["--top-k", "from 1 to 1000"]),
    "top-k 10^13": (["locate", "{raster}", "{photo}", "--top-k", "10000000000000"], ["--top-k", "from 1 to 1000"]),
    "rotations 10^8": (["locate", "{raster}", "{photo}", "--rotations", "100000000"], ["--rotations", "from 1 to"]),
    "batch size 0": (["locate", "{raster}", "{photo}", "--batch-size", "0"], ["--batch-size", "from 1 to"]),
    "batch size 10^8": (["locate", "{raster}", "{photo}", "--batch-size", "100000000"], ["--batch-size", "from 1"]),
    "device bogus": (["locate", "{raster}", "{photo}", "--device", "bogus"], ["--device", "auto, cpu, cuda"]),
    "stride not 1/n": (["locate", "{raster}", "{photo}", "--stride", "0.3"], ["stride", "1/n"]),
    "weights not weights": (["locate", "{raster}", "{photo}", "--weights", "{junk}"],
                            ["junk.pth", "not a pytorch weights file", "choose"]),
    "weights missing": (["locate", "{raster}", "{photo}", "--weights", "{dir}/none.pth"],
                        ["weights file not found", "--weights"]),
    "index missing raster": (["index", "{dir}/nope.tif"], ["not found"]),
    "index footprint too large": (["index", "{raster}", "--footprint-m", "5000"], ["larger than the raster"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(work: dict[str, Path], case: str) -> None:
    args, phrases = BAD_INPUTS[case]
    names = {k: str(v) for k, v in work.items()}
    argv = [a.format(**names) for a in args]
    if argv[0] == "locate":
        argv += ["--out", str(work["dir"] / "out_bad")]
    assert_user_error(run_cli(*argv, cache=work["cache"]), *phrases)
    assert not (work["dir"] / "out_bad").exists()  # nothing written for a refused job
