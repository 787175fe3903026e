"""Two processes at once: two registry writers, two builders of one index, a builder killed mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .conftest import FOOTPRINT, RASTER, REPO, run_cli

ADD_VERSIONS = """
import sys
from pathlib import Path
from model_backend.learn.versions import ModelRegistry
root, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
reg = ModelRegistry(root)
for i in range(n):
    p = root / "models" / f"{tag}-{i}.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(f"{tag} {i}".encode())
    reg.add(p, None, {"i": i})
"""


def test_two_processes_adding_versions_keep_all_of_them(tmp_path: Path) -> None:
    from model_backend.learn.versions import ModelRegistry

    procs = [subprocess.Popen([sys.executable, "-c", ADD_VERSIONS, str(tmp_path), tag, "40"], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    versions = ModelRegistry(tmp_path).versions()
    assert len(versions) == 80 and len({v.id for v in versions}) == 80
    assert all(ModelRegistry(tmp_path).verify(v) for v in versions)


def test_two_index_runs_on_one_raster_and_cache_build_it_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "CDIKT_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "model_backend", "index", str(RASTER), "--footprint-m", str(FOOTPRINT),
           "--runtime", "torch"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    folders = [f for f in (cache / "indexes").iterdir() if f.is_dir()]
    assert len(folders) == 1 and not (folders[0] / "parts").exists()
    from model_backend.index.store import TileIndex

    idx = TileIndex.open(folders[0])
    assert idx.n_tiles == len(np.unique(np.stack([idx.cols, idx.rows], 1), axis=0))  # no tile twice


def test_a_killed_build_resumes_to_the_same_index(tmp_path: Path) -> None:
    """kill -9 while embedding; the rerun reuses the finished chunks and equals a clean build."""
    from model_backend.index.store import TileIndex

    clean = run_cli("index", RASTER, "--footprint-m", 20.0, "--runtime", "torch", cache=tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    cache = tmp_path / "killed"
    env = {**os.environ, "CDIKT_CACHE_DIR": str(cache), "CDIKT_CHUNK_TILES": "64"}
    proc = subprocess.Popen([sys.executable, "-m", "model_backend", "index", str(RASTER), "--footprint-m", "20",
                             "--runtime", "torch"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(cache.rglob("chunk_*.npz")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli("index", RASTER, "--footprint-m", 20.0, "--runtime", "torch", cache=cache,
                      env={"CDIKT_CHUNK_TILES": "64"})
    assert resumed.returncode == 0, resumed.stderr
    a = TileIndex.open(next(f for f in (tmp_path / "clean" / "indexes").iterdir() if f.is_dir()))
    b = TileIndex.open(next(f for f in (cache / "indexes").iterdir() if f.is_dir()))
    assert np.array_equal(a.cols, b.cols) and np.array_equal(a.rows, b.rows)
    np.testing.assert_allclose(np.asarray(a.embeddings, np.float32), np.asarray(b.embeddings, np.float32), atol=2e-3)


def test_the_cache_is_listed_and_pruned_but_never_under_a_builder(tmp_path: Path) -> None:
    """`cache --list` shows indexes and partial builds; `--prune` removes old partial builds and the least
    recently used indexes down to the limit, and keeps a folder whose builder holds its lock and the most
    recently used index."""
    import json

    from model_backend.core.locks import file_lock

    cache = tmp_path / "cache"
    for fp in (40.0, 50.0):
        assert run_cli("index", RASTER, "--footprint-m", fp, "--runtime", "torch", cache=cache).returncode == 0
    indexes = sorted((f for f in (cache / "indexes").iterdir() if f.is_dir()), key=lambda f: f.stat().st_mtime)
    partial = cache / "indexes" / "0123456789abcdef01234567"
    (partial / "parts").mkdir(parents=True)
    (partial / "parts" / "chunk_000000.npz").write_bytes(b"\0" * 1000)
    result = cache / "results" / "DJI_0001-20261101-1"  # a Locate of the plugin, a month ago
    result.mkdir(parents=True)
    (result / "DJI_0001.heatmap.tif").write_bytes(b"\0" * 500)
    old = time.time() - 30 * 86400
    for f in (partial, partial / "parts", partial / "parts" / "chunk_000000.npz", result,
              result / "DJI_0001.heatmap.tif"):
        os.utime(f, (old, old))
    listed = [json.loads(line) for line in run_cli("cache", "--list", cache=cache).stdout.splitlines()]
    kinds = sorted(e["kind"] for e in listed if "kind" in e)
    assert kinds.count("index") == 2 and "partial" in kinds and "results" in kinds
    assert listed[-1]["entries"] == len(listed) - 1
    oldest, newest = indexes
    with file_lock(oldest / ".lock"):  # a builder at work on the oldest
        proc = run_cli("cache", "--prune", "--max-gb", "0", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists() and oldest.exists() and (oldest / "manifest.json").is_file()
    assert run_cli("cache", "--prune", "--max-gb", "0", cache=cache).returncode == 0
    assert not oldest.exists()
    assert newest.exists() and (newest / "manifest.json").is_file()  # the one in use survives any limit
    assert result.exists()  # results may be layers of a saved project: removed only when asked
    assert run_cli("cache", "--prune", "--results", cache=cache).returncode == 0 and not result.exists()


def test_what_a_killed_writer_leaves_is_swept_by_the_next(tmp_path: Path) -> None:
    """kill -9 skips every cleanup: the hidden temp files and folders it leaves go with the next write
    of the same name, once they are an hour old (a live writer keeps touching its own)."""
    from model_backend.core.atomic import atomic_path, atomic_write_bytes
    from model_backend.locate.outputs import output_set

    old = time.time() - 2 * 3600
    left = [tmp_path / ".m.safetensors.abc123.part", tmp_path / ".DJI_0001.x1y2.partial"]
    for d in left:
        d.mkdir()
        (d / "half").write_bytes(b"\0" * 100)
        os.utime(d, (old, old))
    (tmp_path / ".registry.json.q9.tmp").write_bytes(b"{")
    os.utime(tmp_path / ".registry.json.q9.tmp", (old, old))
    fresh = tmp_path / ".m.safetensors.live.part"  # another writer at work right now
    fresh.mkdir()
    with atomic_path(tmp_path / "m.safetensors") as tmp:
        Path(tmp).write_bytes(b"model")
    with output_set(tmp_path, "DJI_0001") as staged:
        (staged / "DJI_0001.matches.geojson").write_text("{}")
    atomic_write_bytes(tmp_path / "registry.json", b"{}")
    assert not any(p.exists() for p in left) and not (tmp_path / ".registry.json.q9.tmp").exists()
    assert fresh.exists()


def test_a_killed_adaptation_leaves_no_model_and_no_version(tmp_path: Path) -> None:
    """kill -9 while adapting: no output file, no registry entry, the next run starts clean."""
    from model_backend.learn.versions import ModelRegistry

    from .test_malformed import make_labels

    labels = make_labels(tmp_path)
    data = tmp_path / "data"
    env = {**os.environ, "CDIKT_CACHE_DIR": str(tmp_path / "cache"), "CDIKT_DATA_DIR": str(data)}
    out = tmp_path / "models" / "adapted.safetensors"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "model_backend", "adapt", "--raster", str(RASTER), "--labels",
                             str(labels), "--out", str(out), "--epochs", "2", "-v"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # kill it once it trains: the point of no return for a careless writer
        if "%]" in line and ("Training" in line or "epoch" in line.lower() or "views" in line.lower()):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and ModelRegistry(data).versions() == []
    assert not [p for p in out.parent.iterdir() if not p.name.startswith(".")]
