"""`make bench`: every figure of the engine (speed, accuracy, scale, training, adaptation) in one JSON line.

Kept out of the test suite (tests stay fast) but run on the same code paths the plugin uses:
`EmbeddingModel.embed`, `build_index`, `score_tiles` + `select_candidates` + `write_heatmap`,
`embed_photo` and `synthetic_localisation`; the other parts are in bench_parts.py. The last
line printed is one JSON object, with a `floors` summary, so a script or CI can keep a history;
see docs/benchmarks.md for what each figure means. A part that fails is recorded as
`<part>_error` and the others still run.

Machines are shared and noisy (on the 2-core development VM the model alone swings 2-4x within
a minute), so the model-alone figure is not timed in a separate window:
one model-alone batch is timed right after each batch of the end-to-end build, and a
neighbour's burst slows both sides of the ratio alike. Everything, the CPU runtime's ONNX
export included, is written under one temporary folder removed at the end: the user's cache
is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_backend.bench.common import BATCH, DATA, ROOT, SEED
from model_backend.bench.flight import flight_benchmark, flight_scale_benchmark
from model_backend.bench.footprint import footprint_benchmark
from model_backend.bench.localisation import synthetic_localisation
from model_backend.bench.parts import FLOORS, QUICK_SKIPS, SCALE_PARTS, device_name, floors, peak_rss_mb, run_part
from model_backend.bench.scale import mosaic_vrt
from model_backend.core.config import ModelConfig, TilingConfig
from model_backend.core.machine import cpu_identity
from model_backend.core.space import folder_bytes
from model_backend.geo.exif import load_photo
from model_backend.geo.raster import open_raster
from model_backend.geo.reader import StripReader, compute_stretch
from model_backend.geo.tiling import TileGrid, make_grid
from model_backend.index import build as indexing
from model_backend.index.build import build_index, tile_batches
from model_backend.index.store import TileIndex
from model_backend.locate.candidates import select_candidates
from model_backend.locate.heatmap import write_heatmap
from model_backend.locate.query import embed_photo, score_tiles
from model_backend.nn.embedder import EmbeddingModel
from model_backend.nn.runtime import cpu_threads, runner_label

MOSAIC_SOURCES = (DATA / "manila_oam_0.10m.tif", ROOT / "resources" / "sample" / "manila_oam_0.10m.tif")
PHOTOS = (DATA / "DJI_0061.JPG", ROOT / "resources" / "sample" / "drone_view.jpg")
ACCURACY_SETS = (("manila_oam_0.10m.tif", 40.0), ("netherlands_aerial_0.25m_epsg28992.tif", 50.0),
                 ("bali_pix4d_0.35m_alpha.tif", 50.0))
"""Rasters of three CRSs, resolutions and mask kinds, with a footprint each fits many times."""
QUERY_SIDE = 317
"""317 x 317 = 100,489 tiles: the 10^5-tile index of the query figure."""

Say = Callable[[str], None]


def _first(paths: tuple[Path, ...]) -> Path:
    """The test data when present (a checkout), else the copy shipped in resources/ (a package)."""
    return next((p for p in paths if p.exists()), paths[-1])


def model_tiling(vrt: Path, input_size: int) -> TilingConfig:
    """A footprint of `input_size` source pixels, so tiles are read at the raster's own resolution."""
    info = open_raster(vrt)
    return TilingConfig(footprint_m=input_size * info.gsd_x_m)


@dataclass
class PairedBuild:
    """One build_index run with a model-alone batch timed right after each of its batches."""

    index: TileIndex
    wall_s: float
    """The whole call, control batches included."""
    e2e: list[tuple[int, float]] = field(default_factory=list)
    """(tiles, seconds) from the end of one control batch to the end of the next real batch."""
    control: list[tuple[int, float]] = field(default_factory=list)
    """(tiles, seconds) of each model-alone batch."""


def paired_build(net: EmbeddingModel, vrt: Path, tiling: TilingConfig, cache: Path,
                 control: torch.Tensor) -> PairedBuild:
    """build_index from scratch, with `embed(control)` timed after every real batch.

    On a shared machine the CPU we get changes 2-4x within seconds, so a model-alone window
    and a build timed one after the other compare two different machines. Paired batch by
    batch, both sides see the same load. The reader is idle during a control batch (its queue
    is full: it is far faster than the model), so the pairing leaves the pipeline's own
    overlap — or lack of it — in the real batches' intervals.

    The build embeds uint8 batches through `indexing.uint8_embedder` when the runtime can (the
    control batch stays float: the graph's own normalisation counts against end to end), else
    through `net.embed`; whichever it uses is the one wrapped.
    """
    embed = net.embed
    raw = indexing.uint8_embedder(net)
    inner = raw if raw is not None else embed
    e2e: list[tuple[int, float]] = []
    ctl: list[tuple[int, float]] = []
    last = [time.perf_counter()]

    def paired(batch: torch.Tensor | np.ndarray) -> np.ndarray:
        out = inner(batch)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        e2e.append((len(out), t1 - last[0]))
        embed(control)
        last[0] = time.perf_counter()
        ctl.append((len(control), last[0] - t1))
        return out

    real_uint8_embedder = indexing.uint8_embedder
    if raw is not None:
        indexing.uint8_embedder = lambda _net: paired  # type: ignore[assignment]
    else:
        net.embed = paired  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        last[0] = t0
        idx = build_index(str(vrt), tiling, ModelConfig(batch_size=BATCH), cache_dir=cache, embedder=net)
        wall = time.perf_counter() - t0
    finally:
        indexing.uint8_embedder = real_uint8_embedder  # type: ignore[assignment]
        vars(net).pop("embed", None)
    return PairedBuild(idx, wall, e2e, ctl)


def bench_speed(net: EmbeddingModel, tmp: Path, quick: bool, say: Say) -> dict[str, Any]:
    """Model alone vs build_index end to end, paired batch by batch; also the reader alone and index size."""
    nx, ny = (2, 1) if quick else (2, 2)
    src = _first(MOSAIC_SOURCES)
    size = net.meta.input_size
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    batch = net.normalise(images)
    raw = indexing.uint8_embedder(net)  # made (compiled, checked) here: once per process, like loading
    for _ in range(2):  # warm-up: allocator, oneDNN primitive cache, CUDA context
        net.embed(batch)
        if raw is not None:
            raw(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    what = "read + gather uint8" if raw is not None else "read + normalise"

    # The reader alone (decode + resample + batch, one thread), on copies nothing has read yet.
    vrt = mosaic_vrt(src, nx, ny, tmp / "mosaic_reader")
    tiling = model_tiling(vrt, size)
    info = open_raster(vrt)
    grid = make_grid(info, tiling)
    t0, c0, n_read = time.perf_counter(), time.thread_time(), 0
    with StripReader(info, grid, size, compute_stretch(info)) as reader:
        for cols, _, _ in tile_batches(reader, net, 0, grid.n_rows, BATCH, tiling.min_valid_fraction, raw is not None):
            n_read += len(cols)
    reader_rate = n_read / (time.perf_counter() - t0)
    reader_cpu_ms = 1000 * (time.thread_time() - c0) / max(1, n_read)
    say(f"raster   {nx}x{ny} VRT mosaic of {src.name}: {info.width}x{info.height} px, {grid.n_cols}x{grid.n_rows} "
        f"tiles of {grid.tile_w:.0f} px (footprint {tiling.footprint_m:.2f} m)")
    say(f"reader   {reader_rate:8.1f} tiles/s  {what} alone, one thread ({n_read} tiles, "
        f"{reader_cpu_ms:.3f} ms CPU per tile)")

    vrt = mosaic_vrt(src, nx, ny, tmp / "mosaic_e2e")  # fresh copies: nothing of them is cached yet
    run = paired_build(net, vrt, model_tiling(vrt, size), tmp / "cache_e2e", batch)
    n = run.index.n_tiles
    ctl_tiles, ctl_s = sum(c[0] for c in run.control), sum(c[1] for c in run.control)
    model_rate = ctl_tiles / ctl_s
    e2e_rate = n / (run.wall_s - ctl_s)  # the build's own time: setup, reading, embedding, saving
    pair = statistics.median((c[1] / c[0]) / (e[1] / e[0]) for e, c in zip(run.e2e, run.control))
    index_bytes = folder_bytes(run.index.folder) / n * 1e6
    say(f"model    {model_rate:8.1f} tiles/s  embed() alone, batch {BATCH}, pre-normalised ({len(run.control)} "
        f"batches, each right after one of the build's)")
    say(f"e2e      {e2e_rate:8.1f} tiles/s  build_index from scratch: read + embed + store ({n} tiles)")
    say(f"ratio    {e2e_rate / model_rate:8.3f}        end to end / model alone (floor >= 0.90; "
        f"median batch pair {pair:.3f})")
    say(f"index    {index_bytes / 1e9:8.3f} GB per 10^6 tiles (measured on the finished index folder)")
    return {
        "model_tiles_per_s": round(model_rate, 2), "e2e_tiles_per_s": round(e2e_rate, 2),
        "e2e_vs_model": round(e2e_rate / model_rate, 3), "e2e_vs_model_median_pair": round(pair, 3),
        "reader_tiles_per_s": round(reader_rate, 1), "reader_cpu_ms_per_tile": round(reader_cpu_ms, 3),
        "e2e_input": "uint8" if raw is not None else "float", "e2e_tiles": n,
        "e2e_raster": f"{nx}x{ny} VRT mosaic of {src.name}, {info.width}x{info.height} px",
        "index_bytes_per_1e6_tiles": round(index_bytes),
    }


def bench_query(dim: int, tmp: Path, say: Say, reps: int = 3) -> dict[str, Any]:
    """Scoring + top-k candidates + heatmap on 10^5 random unit fp16 vectors, photo embedding excluded.

    The vectors are saved and memory-mapped, as `TileIndex.open` does, on a 317 x 317 grid in a
    real raster's CRS, so the heatmap and candidate code do their real work.
    """
    info = open_raster(_first(MOSAIC_SOURCES))
    step = 112.0
    side = QUERY_SIDE
    grid = TileGrid(crs_wkt=info.crs_wkt, transform=info.transform, raster_width=round((side + 1) * step),
                    raster_height=round((side + 1) * step), tile_w=2 * step, tile_h=2 * step, step_x=step,
                    step_y=step, cells_per_tile=2, n_cols=side, n_rows=side, footprint_m=2 * step * info.gsd_x_m)
    n = grid.n_tiles
    rng = np.random.default_rng(SEED)
    emb = np.empty((n, dim), np.float16)
    for s in range(0, n, 8192):  # in chunks: a float32 copy of the whole index would double the peak memory
        v = rng.standard_normal((min(8192, n - s), dim), dtype=np.float32)
        emb[s:s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    folder = tmp / "query_index"
    folder.mkdir()
    np.save(folder / "embeddings.npy", emb)
    del emb
    rows, cols = np.divmod(np.arange(n, dtype=np.int32), side)
    idx = TileIndex(folder, {}, np.load(folder / "embeddings.npy", mmap_mode="r"), cols, rows, grid)
    q = rng.standard_normal((8, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    parts: list[tuple[float, float, float]] = []
    for i in range(reps):
        t0 = time.perf_counter()
        scores = score_tiles(idx, q)
        t1 = time.perf_counter()
        select_candidates(scores, 5, 0.1)
        t2 = time.perf_counter()
        write_heatmap(str(tmp / f"query_heatmap{i}.tif"), scores)
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    total = statistics.median(sum(p) for p in parts)
    med = [statistics.median(p[k] for p in parts) for k in range(3)]
    say(f"query    {total:8.3f} s        {n:,} tiles x {dim}-d fp16, 8 rotations: score {med[0]:.3f} s, "
        f"top-5 {med[1]:.3f} s, heatmap {med[2]:.3f} s (median of {reps}; target <= 1 s)")
    return {"query_s_1e5": round(total, 4), "query_tiles": n,
            "query_parts_s": {"score": round(med[0], 4), "candidates": round(med[1], 4), "heatmap": round(med[2], 4)}}


def bench_photo(net: EmbeddingModel, say: Say, reps: int = 3) -> dict[str, Any]:
    """One real drone photo, decoded once, embedded at 8 headings (what every query pays first)."""
    path = _first(PHOTOS)
    t0 = time.perf_counter()
    image = load_photo(str(path))
    load_s = time.perf_counter() - t0
    embed_photo(net, image, 8)  # warm-up: batch of 8 is a new shape for the allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        embed_photo(net, image, 8)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    say(f"photo    {s:8.3f} s        {path.name} ({image.shape[1]}x{image.shape[0]}) at 8 rotations "
        f"(decode {load_s:.3f} s, not included)")
    return {"photo_embed_s": round(s, 4), "photo_decode_s": round(load_s, 4), **bench_synth_render(say, reps)}


def bench_synth_render(say: Say, reps: int = 3) -> dict[str, Any]:
    """One semi-synthetic drone view rendered from the mosaic source (what training and the accuracy sets pay)."""
    from model_backend.learn.datasets.synth import make_views, render_view

    raster = str(_first(MOSAIC_SOURCES))
    (view,) = make_views(raster, 1, 60.0, seed=4)
    render_view(raster, view.spec)  # warm: the file's header and overviews are read once
    t0 = time.perf_counter()
    for _ in range(reps):
        render_view(raster, view.spec)
    s = (time.perf_counter() - t0) / reps
    say(f"synth    {s:8.3f} s        one 640x480 view rendered from {Path(raster).name}")
    return {"synth_render_s": round(s, 4)}


def bench_accuracy(net: EmbeddingModel, tmp: Path, n_views: int, say: Say) -> dict[str, Any]:
    """Top-1/top-5 hit rates and centre error on semi-synthetic views of three rasters (seed 11)."""
    per: dict[str, Any] = {}
    errors: list[float] = []
    hit1 = hit5 = n = 0.0
    for name, fp in ACCURACY_SETS:
        path = DATA / name
        if not path.exists():
            say(f"accuracy {name}: missing (tests/data is not shipped in the plugin package); skipped")
            continue
        t0 = time.perf_counter()
        rep = synthetic_localisation(str(path), n_views, fp, SEED, embedder=net, cache_dir=str(tmp / "cache_acc"))
        dt = time.perf_counter() - t0
        per[path.stem] = {**rep.to_dict(), "seconds": round(dt, 1)}
        errors += rep.errors_m
        hit1 += rep.hit1 * rep.n
        hit5 += rep.hit5 * rep.n
        n += rep.n
        emb = "" if rep.hit1_embedding is None else f" (embedding alone {rep.hit1_embedding:.1%})"
        say(f"accuracy {path.stem:38s} fp {fp:4.0f} m  top1 {rep.hit1:6.1%}{emb}  top5 {rep.hit5:6.1%}  "
            f"median error {rep.median_error_m:7.1f} m  ({rep.n} views, {dt:.0f} s)")
    if not n:
        return {"accuracy": per}
    med = float(np.median(errors))
    say(f"accuracy {'overall':38s}          top1 {hit1 / n:6.1%}  top5 {hit5 / n:6.1%}  "
        f"median error {med:7.1f} m  ({int(n)} views)")
    return {"accuracy_top1": round(hit1 / n, 4), "accuracy_top5": round(hit5 / n, 4),
            "median_error_m": round(med, 2), "accuracy_views": int(n), "accuracy": per}


PARTS = ("speed", "query", "photo", "accuracy", "footprint", "cross_year", "flight", "flight_scale", *SCALE_PARTS,
         "training", "gpu", "adapt", "adapt_matrix")
"""Every part, in the order run; `--skip scale` stands for all of SCALE_PARTS."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model_backend.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: smaller mosaic and sets, fewer views, no {', '.join(QUICK_SKIPS)} (~3 minutes)")
    ap.add_argument("--json-only", action="store_true", help="print only the final JSON line")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, help="CPU threads for the model (default: the runtime's choice)")
    ap.add_argument("--runtime", default="auto", help="CPU runtime: auto, torch, openvino or onnxruntime")
    ap.add_argument("--views", type=int, help="views per raster for accuracy (default 60, quick 12)")
    ap.add_argument("--cross-year-seeds", type=int, default=3,
                    help="seeds of the cross-year part (6 year pairs each; default 3, quick 1)")
    ap.add_argument("--cross-year-views", type=int, default=20,
                    help="views per (year pair, seed) of the cross-year part (default 20, quick 8)")
    ap.add_argument("--matrix-seeds", type=int, default=5,
                    help="seeds of the adaptation matrix (6 year pairs x 2 footprints each; ~2.5 h for 5 on 2 cores)")
    ap.add_argument("--matrix-log", type=Path, help="JSON-lines file the matrix appends each run to and resumes from")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}, or scale")
    ap.add_argument("--report-only", action="store_true",
                    help="exit 0 even when a part failed or a measured floor is not met (default: exit 1)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "scale" in skip:
        skip |= set(SCALE_PARTS)
    unknown = skip - set(PARTS) - {"scale"}
    if unknown:
        ap.error(f"unknown part(s) to skip: {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}, scale")
    args.skip_parts = skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GDAL_PAM_ENABLED", "NO")  # never write .aux.xml beside tests/data
    say: Say = (lambda _msg: None) if args.json_only else (lambda msg: print(msg, flush=True))
    t_start = time.perf_counter()
    user_cache = os.environ.get("CDIKT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="cdikt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Before loading: the CPU runtime's ONNX export is cached too, and never in the user's cache.
        os.environ["CDIKT_CACHE_DIR"] = str(tmp / "cache")
        try:
            out = run_all(args, tmp, t_start, say)
        finally:
            if user_cache is None:
                os.environ.pop("CDIKT_CACHE_DIR", None)
            else:
                os.environ["CDIKT_CACHE_DIR"] = user_cache
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["floors"], out["floors_all_met"] = floors(out)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    for name, f in out["floors"].items():
        if FLOORS[name].floor is not None:  # a floor with a number (or a measured limit) to meet
            state = "not measured" if f["met"] is None else ("met" if f["met"] else "NOT MET")
            limit = f['floor'] if f['floor'] is not None else FLOORS[name].floor
            say(f"floor    {name:24s} {f['value']!s:>14} {f['cmp']} {limit!s:<14} {state}")
    say(f"memory   {out['peak_rss_mb']:8.1f} MB peak RSS ({out['rss_after_load_mb']:.0f} MB after loading the "
        f"model); total {out['seconds']:.0f} s")
    print(json.dumps(out), flush=True)
    failed = failures(out)
    if failed:
        print(f"bench: {'; '.join(failed)}" + (" (--report-only: exit 0)" if args.report_only else ""),
              file=sys.stderr, flush=True)
        return 0 if args.report_only else 1
    return 0


def failures(out: dict[str, Any]) -> list[str]:
    """Why this run should fail: parts that raised, and floors measured and not met (skipped ones are not)."""
    failed = [f"part {k[:-len('_error')]} failed" for k in sorted(out) if k.endswith("_error")]
    failed += [f"floor {name} not met ({f['value']} {f['cmp']} {f['floor']})"
               for name, f in out.get("floors", {}).items() if f["met"] is False]
    return failed


def run_all(args: argparse.Namespace, tmp: Path, t_start: float, say: Say) -> dict[str, Any]:
    """Load the model, then each part not skipped, in the order the figures are printed; a failing part
    leaves `<part>_error` and the next one runs."""
    from model_backend.bench import parts as bp

    skip: set[str] = args.skip_parts
    net = EmbeddingModel.load(device=args.device, threads=args.threads, runtime=args.runtime)
    threads = torch.get_num_threads() if net.runtime == "torch" else cpu_threads(args.threads)
    out: dict[str, Any] = {
        "device": str(net.device), "device_name": device_name(net.device), "runtime": net.runtime,
        "torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(), "model": net.meta.weights_name, "dim": net.meta.dim,
        "input_size": net.meta.input_size, "batch_size": BATCH, "quick": args.quick,
        "model_load_s": round(time.perf_counter() - t_start, 2), "rss_after_load_mb": round(peak_rss_mb(), 1),
        "cpu": cpu_identity().to_dict(),
    }
    say(f"cdikt bench: {out['device_name']} ({out['device']}), runtime {runner_label(net.runner)} "
        f"with {threads} threads, "
        f"torch {out['torch']}, {out['cpu_count']} CPUs, {net.meta.weights_name}{' (quick)' if args.quick else ''}; "
        f"model load {out['model_load_s']:.1f} s (with the runtime's export)")
    say(f"cpu      {cpu_identity().describe()}: figures from another processor are not comparable")
    q = args.quick
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "speed": lambda: bench_speed(net, tmp, q, say),
        "query": lambda: bench_query(net.meta.dim, tmp, say),
        "photo": lambda: bench_photo(net, say),
        "accuracy": lambda: bench_accuracy(net, tmp, args.views or (12 if q else 60), say),
        "footprint": lambda: footprint_benchmark(net, tmp, args.views or (12 if q else 60), say),
        "cross_year": lambda: bp.part_cross_year(1 if q else args.cross_year_seeds, 8 if q else args.cross_year_views,
                                                 bool(q), tmp, say),
        "flight": lambda: flight_benchmark(net, tmp, say, seeds=(2,) if q else (2, 3, 4), n_photos=12 if q else 30),
        "flight_scale": lambda: flight_scale_benchmark(net, tmp, say, n_photos=60 if q else 500,
                                                       tolerances=(0.0,) if q else (0.0, 0.3)),
        "runtimes": lambda: bp.part_runtimes(args.threads, q, say),
        "query_with_embed": lambda: bp.part_query_with_embed(q, say),
        "ann": lambda: bp.part_ann(q, say),
        "rss40k": lambda: bp.part_rss40k(say),
        "sharding": lambda: bp.part_sharding(say),
        "training": lambda: bp.part_training(cpu_threads(args.threads), q, say),
        "gpu": lambda: bp.part_gpu(q, say),
        "adapt": lambda: bp.part_adapt(say),
        "adapt_matrix": lambda: bp.part_adapt_matrix(args.matrix_seeds, args.matrix_log, say),
    }
    for name in PARTS:
        if name in skip:
            continue
        if q and name in QUICK_SKIPS:
            out[f"{name}_skipped"] = "--quick"
            continue
        run_part(name, parts[name], out, say)
    out["skipped_parts"] = sorted(skip)
    return out


if __name__ == "__main__":
    sys.exit(main())
