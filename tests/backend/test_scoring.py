"""Scoring at memory speed (index.scoring): every kernel against exact fp32 scores, its copy's life, the choice.

Vectors are real tile embeddings of the sample rasters repeated with small noise (as in
test_ann), 25,000 of them: above MIN_TILES_FOR_COPY, so the copy kernels really run on a copy
kept beside the index, as they do for an analyst's 10^5-tile raster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_backend.bench.common import augment
from model_backend.bench.scale import real_tiles
from model_backend.core import machine
from model_backend.geo.tiling import TileGrid
from model_backend.index import scoring
from model_backend.index.store import TileIndex, file_checksums
from model_backend.locate.candidates import select_candidates
from model_backend.locate.scores import TileScores

N = 25_000
SIDE = 125  # 125 x 200 tiles


@pytest.fixture(scope="module")
def base(embedder) -> np.ndarray:
    tiles = real_tiles(224, per_raster=16)
    return np.concatenate([embedder.embed(embedder.normalise(tiles[i:i + 32])) for i in range(0, len(tiles), 32)])


def make_index(folder: Path, base: np.ndarray) -> TileIndex:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", augment(base, N, 0.01, seed=7))
    rows, cols = np.divmod(np.arange(N), SIDE)
    np.save(folder / "tiles.npy", np.stack([cols, rows], axis=1).astype(np.int32))
    grid = TileGrid(crs_wkt="EPSG:32633", transform=(1.0, 0.0, 500000.0, 0.0, -1.0, 5000000.0),
                    raster_width=(SIDE + 1) * 32, raster_height=(N // SIDE + 1) * 32, tile_w=64, tile_h=64,
                    step_x=32, step_y=32, cells_per_tile=2, n_cols=SIDE, n_rows=N // SIDE, footprint_m=64.0)
    manifest = {"checksums": file_checksums(folder)}
    return TileIndex(folder, manifest, np.load(folder / "embeddings.npy", mmap_mode="r"), cols, rows, grid)


@pytest.fixture()
def index(base: np.ndarray, tmp_path: Path) -> TileIndex:
    return make_index(tmp_path / "index", base)


def queries(base: np.ndarray, seed: int) -> np.ndarray:
    return augment(base, 8, 0.02, seed=seed).astype(np.float32)  # eight "headings" of a photo


@pytest.mark.parametrize("kernel", scoring.KERNELS)
def test_every_kernel_gives_todays_candidates_and_heatmap(index: TileIndex, base: np.ndarray, kernel: str) -> None:
    q = queries(base, 11)
    sims = np.asarray(index.embeddings, np.float32) @ q.T
    exact_best, exact_which = sims.max(axis=1), sims.argmax(axis=1)
    best, which = scoring.max_scores(index, q, kernel=kernel)
    assert best.dtype == np.float32 and which.dtype == np.int16 and best.shape == (N,)
    # Everywhere: within the kernel's rounding (invisible in a heatmap) ...
    assert np.abs(best - exact_best).max() < 3e-3
    second = np.sort(sims, axis=1)[:, -2]
    clear = exact_best - second > 4e-3  # only near-ties between headings may swap
    assert clear.mean() > 0.5 and np.array_equal(which[clear], exact_which[clear])
    # ... and the shortlist exact: the same top tiles, the same scores and headings there.
    top = np.argsort(-exact_best, kind="stable")[:50]
    np.testing.assert_allclose(best[top], exact_best[top], atol=1e-6)
    assert np.array_equal(which[top], exact_which[top])
    ours = TileScores(index.grid, index.cols, index.rows, best, which)
    exact = TileScores(index.grid, index.cols, index.rows, exact_best, exact_which)
    mine = select_candidates(ours, 10, 0.1)
    want = select_candidates(exact, 10, 0.1)
    assert [(c.x, c.y) for c in mine] == [(c.x, c.y) for c in want]
    np.testing.assert_allclose([c.score for c in mine], [c.score for c in want], atol=1e-6)
    assert np.nanmax(np.abs(ours.heatmap() - exact.heatmap())) < 3e-3
    copies = sorted(p.name for p in index.folder.glob("scoring-*"))
    assert bool(copies) == (kernel in scoring.COPY_KERNELS)


def test_a_copy_is_made_once_named_by_its_source_and_remade_when_damaged(index: TileIndex, base: np.ndarray,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    q = queries(base, 12)
    first, _ = scoring.max_scores(index, q, kernel="int8")
    sha = index.manifest["checksums"]["embeddings.npy"][:16]
    rows_path, scale_path = scoring.copy_paths(index.folder, sha, "int8")
    assert rows_path.is_file() and scale_path.is_file()
    stamp = rows_path.stat().st_mtime_ns
    scoring._OPENED.clear()  # a new process
    scoring.max_scores(index, q, kernel="int8")
    assert rows_path.stat().st_mtime_ns == stamp  # reused, not rewritten
    # A damaged copy (bytes overwritten on disk) is caught by the spot check and made again.
    damaged = np.load(rows_path, mmap_mode="r+")
    damaged[:] = 127
    damaged.flush()
    del damaged
    scoring._OPENED.clear()
    again, _ = scoring.max_scores(index, q, kernel="int8")
    assert "damaged" in caplog.text
    np.testing.assert_array_equal(again, first)
    # Rebuilt embeddings (another checksum) never meet the old copy: it is replaced, not reused.
    other = make_index(index.folder, base[::-1].copy())
    assert other.manifest["checksums"]["embeddings.npy"] != index.manifest["checksums"]["embeddings.npy"]
    scoring.max_scores(other, q, kernel="int8")
    names = {p.name for p in index.folder.glob("scoring-int8-*")}
    assert rows_path.name not in names and len(names) == 2  # its rows and its scales


def test_a_full_disk_falls_back_to_the_fp16_rows(index: TileIndex, base: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scoring, "_write_copy", no_space)
    q = queries(base, 14)
    best, which = scoring.max_scores(index, q, kernel="bf16")
    exact = np.asarray(index.embeddings, np.float32) @ q.T
    assert "Could not keep a bf16 copy" in caplog.text
    np.testing.assert_allclose(best, exact.max(axis=1), atol=1e-5)
    assert not list(index.folder.glob("scoring-*"))


def test_the_kernel_is_measured_once_per_machine_and_small_indexes_write_no_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path / "machine"))
    scoring._remembered_kernels.cache_clear()
    measured = scoring.measured_kernels(64)
    assert measured["kernel"] in scoring.KERNELS and measured["ms"][measured["kernel"]] is not None
    assert measured["ms"]["fp32"] is not None and measured["ms"]["fp16"] is not None  # always available
    stored = json.loads(machine.profile_path().read_text())
    assert stored["cpu"]["key"] == machine.cpu_identity().key
    assert any(t.startswith("scoring/64d/") for t in stored["choices"])
    # Remembered: a second process (no in-memory cache) reads the profile instead of measuring.
    scoring._remembered_kernels.cache_clear()
    monkeypatch.setattr(scoring, "measure_kernels", lambda *_a, **_k: pytest.fail("measured twice"))
    assert scoring.measured_kernels(64) == measured
    assert scoring.choose_kernel(64, scoring.MIN_TILES_FOR_COPY - 1) not in scoring.COPY_KERNELS
    assert scoring.choose_kernel(64, 10 ** 6) == measured["kernel"]
    scoring._remembered_kernels.cache_clear()


def test_the_machine_profile_names_the_processor_and_forgets_on_request(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path))
    cpu = machine.cpu_identity()
    assert cpu.model and cpu.cores >= 1 and len(cpu.key) == 16
    calls = []
    got = machine.remembered("t/a", lambda: calls.append(1) or {"x": 1})
    assert got == {"x": 1} and machine.remembered("t/a", lambda: {"x": 2}) == {"x": 1} and calls == [1]
    machine.remembered("u/b", lambda: {"y": 1})
    assert set(machine.profile()["choices"]) == {"t/a", "u/b"}
    assert machine.forget("t/") == 1 and set(machine.profile()["choices"]) == {"u/b"}
    # A profile of another format is measured again, not trusted.
    machine.profile_path().write_text(json.dumps({"format": 99, "choices": {"u/b": {"y": 5}}}))
    assert machine.remembered("u/b", lambda: {"y": 6}) == {"y": 6}


def test_cli_machine_prints_the_processor_and_its_measured_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from model_backend.cli import main

    monkeypatch.setenv("CDIKT_MACHINE_DIR", str(tmp_path))
    scoring._remembered_kernels.cache_clear()
    scoring.measured_kernels(64)
    scoring._remembered_kernels.cache_clear()
    assert main(["machine"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cpu"]["model"] == machine.cpu_identity().model and out["file"] == str(machine.profile_path())
    assert [t for t in out["choices"] if t.startswith("scoring/64d/")]
