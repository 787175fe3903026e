"""Command line: `python -m model_backend index|locate ...`.

Scripts depend on these command and option names: keep them stable. User mistakes exit with
status 2 and one line on stderr that says what is wrong and what to do; results go to stdout
as one JSON line per photo so they can be piped into other tools.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from model_backend.core.config import (
    ADAPT_LOOKS,
    DEVICE_PATTERN,
    MAX_BATCH,
    MAX_ROTATIONS,
    MAX_TOP_K,
    RUNTIME_NAMES,
    ModelConfig,
    QueryConfig,
    TilingConfig,
)
from model_backend.core.errors import Cancelled, CdiktError
from model_backend.core.requests import AdaptRequest, FlightRequest, IndexRequest, LocateRequest

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


def _weights(p: argparse.ArgumentParser, text: str = "model weights file (.safetensors or .pth); "
                                                  "default: the embedded model") -> None:
    p.add_argument("--weights", help=text)


def _cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="where indexes are kept (default: $CDIKT_CACHE_DIR or ~/.cache/cdikt-qgis)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=32)


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true")


def _common(p: argparse.ArgumentParser) -> None:
    """Options of the commands that build or query an index (`index`, `locate`)."""
    _weights(p)
    _device(p)
    p.add_argument("--stride", type=float, default=0.5, help="tile step as a fraction of the footprint (1/n)")
    _cache_dir(p)
    p.add_argument("--runtime", default="auto", choices=RUNTIME_NAMES,
                   help="CPU inference engine (default auto: the fastest measured on this machine, once; "
                        "see the `machine` command)")
    _verbose(p)


def _locate_options(p: argparse.ArgumentParser) -> None:
    """Options of `locate` and `locate-flight`: one set, so a flight is located exactly as its photos are."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--footprint-m", type=float,
                   help="ground size of the photo's short side in metres (default: EXIF, else a scale search)")
    p.add_argument("--footprint-tolerance", type=float, default=QueryConfig.footprint_tolerance,
                   help="how far the footprint given (or EXIF's) may be off, as a fraction: the sizes /(1+t), x1 "
                        "and x(1+t) are searched and the best is used (default %(default)s; 0: the given size only)")
    p.add_argument("--top-k", type=int, default=QueryConfig.top_k)
    p.add_argument("--rotations", type=int, default=QueryConfig.rotations,
                   help="headings tried for photos of unknown heading")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="match local features to refine the footprint (default: when the photo looks down "
                        "within 30 degrees of nadir, or its pitch is unknown)")
    p.add_argument("--structure", action=argparse.BooleanOptionalAction, default=None,
                   help="re-rank the best candidates by the shape of the ground (field edges, roads, shores), "
                        "which survives other seasons and years (about 1.5 s per photo; default: on for "
                        "locate, off for locate-flight, whose track does that work)")
    p.add_argument("--prior-radius-m", type=float,
                   help="score only tiles within this many metres of the photo's GPS position (EXIF)")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model_backend",
                                 description="Locate drone photos on a georeferenced raster (CDIKTNet engine).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="embed every tile of a raster into the cache (reused by locate)")
    p.add_argument("raster")
    p.add_argument("--footprint-m", type=float, default=TilingConfig.footprint_m,
                   help="ground size of a tile in metres (default %(default)s)")
    p.add_argument("--ann", choices=("auto", "on", "off"), default="auto",
                   help="also build the compressed index (faiss IVF-PQ, ~180 MB per 10^6 tiles instead of 2.6 GB "
                        "scanned per query): auto = from 10^6 tiles up (default), on = always, off = never")
    _common(p)

    p = sub.add_parser("locate", help="find where photos were taken; writes heatmaps and matches")
    p.add_argument("raster")
    p.add_argument("photos", nargs="+", metavar="PHOTO")
    _locate_options(p)

    p = sub.add_parser("locate-flight", help="locate a flight's photos together: a track through their matches")
    p.add_argument("raster")
    p.add_argument("photos", nargs="+", metavar="FOLDER|PHOTO", help="the flight's folder and/or its photos")
    _locate_options(p)
    p.add_argument("--states", type=int, default=100,
                   help="best tiles per photo (besides its candidates) the track may choose among "
                        "(default %(default)s)")
    p.add_argument("--max-speed", type=float, default=20.0, metavar="M_PER_S",
                   help="fastest ground speed between photos (default %(default)s m/s)")
    p.add_argument("--interval-s", type=float, default=3.0,
                   help="seconds between photos when they carry no time (ordered by name; default %(default)s)")
    p.add_argument("--no-gps", dest="use_gps", action="store_false",
                   help="do not use the photos' GPS positions as a prior")
    p.add_argument("--no-motion", dest="motion", action="store_false",
                   help="do not match consecutive photos to measure the moves between them (faster, weaker)")
    p.add_argument("--log", help="flight log CSV (UAV-VisLoc columns: filename, date, lat, lon, height, Phi1)")

    p = sub.add_parser("evaluate", help="benchmark retrieval (R@1/5/10, AP) on University-1652 or SUES-200")
    p.add_argument("--layout", required=True, help="university1652 or sues200")
    p.add_argument("--data", required=True, help="dataset folder (University-1652: train/ and test/; "
                                                 "SUES-200: Training/ and Testing/)")
    p.add_argument("--height", type=int, help="SUES-200 flight height in metres: 150, 200, 250 or 300")
    _weights(p)
    _device(p)
    _verbose(p)

    p = sub.add_parser("machine", help="this processor and what was measured on it: CPU runtime, scoring kernel")
    p.add_argument("--measure", action="store_true",
                   help="forget the stored measurements and measure again now (a few seconds)")
    _weights(p)
    _verbose(p)
    p.set_defaults(device="cpu", batch_size=32)

    p = sub.add_parser("cache", help="list the cache (indexes, partial builds, runtime exports) or shrink it")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="one JSON line per entry (default)")
    group.add_argument("--prune", action="store_true",
                       help="remove partial builds and leftovers older than --older-than-days, then the least "
                            "recently used indexes until the cache fits --max-gb")
    p.add_argument("--max-gb", type=float, default=_env_float("CDIKT_CACHE_MAX_GB"),
                   help="size limit for --prune (default: $CDIKT_CACHE_MAX_GB, else none)")
    p.add_argument("--older-than-days", type=float, default=7.0, help="age of partial builds to remove (default 7)")
    p.add_argument("--dry-run", action="store_true", help="say what --prune would remove, remove nothing")
    p.add_argument("--results", action="store_true",
                   help="--prune also removes the plugin's Locate results older than --older-than-days "
                        "(layers of a saved project may still point at them)")
    _cache_dir(p)
    _verbose(p)
    p.set_defaults(weights=None, device="cpu", batch_size=32)

    from model_backend.learn.training.command import add_parser as add_train_parser  # torch-free: `train` options

    add_train_parser(sub)

    p = sub.add_parser("adapt", help="fine-tune the model on labelled photo pairs of a raster; writes a new model")
    p.add_argument("--raster", required=True, help="the raster the photos were labelled on")
    p.add_argument("--labels", required=True, help="labels .gpkg (any CRS) or .geojson (WGS84): one footprint "
                                                   "polygon per photo, the photo's path in a 'photo' property")
    p.add_argument("--out", required=True, help="new .safetensors file (an existing file is never overwritten)")
    _weights(p, "model to start from (default: the embedded model)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the engine's)")
    p.add_argument("--photos", nargs="*", default=[], metavar="PHOTO",
                   help="unlabelled photos of the area (the rest of the flight): those the current model places "
                   "with confidence train as extra pairs, the others without labels (CDTS)")
    p.add_argument("--flight-photos", action=argparse.BooleanOptionalAction, default=True,
                   help="also use the other photos in the labelled photos' folders as unlabelled photos (default: "
                   "on, as in the dock and Processing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of training")
    p.add_argument("--look", choices=ADAPT_LOOKS, default="auto",
                   help="keep colour, drop it (luminance only: for imagery whose colours change, e.g. crops "
                        "across years), or auto: whichever matches the training pairs better (default)")
    _cache_dir(p)
    _verbose(p)
    p.set_defaults(device="cpu", batch_size=32)
    return ap


RANGES = {"top_k": ("--top-k", 1, MAX_TOP_K), "rotations": ("--rotations", 1, MAX_ROTATIONS),
          "batch_size": ("--batch-size", 1, MAX_BATCH)}
"""Whole-number options and their bounds (core.config's): beyond them a job would ask for absurd
memory or time, so it is refused in one line first."""


def _check_ranges(args: argparse.Namespace) -> None:
    for attr, (flag, lo, hi) in RANGES.items():
        value = getattr(args, attr, None)
        if value is not None and not lo <= value <= hi:
            raise_user(f"{flag} must be from {lo} to {hi}, got {value}.")
    device = getattr(args, "device", None)
    if device is not None and not re.fullmatch(DEVICE_PATTERN, device):
        raise_user(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}.")


def _env_float(name: str) -> float | None:
    """A number from the environment (a setting kept across runs), or None when unset or not a number."""
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def _gdal_messages_to_log() -> None:
    """GDAL's own handler prints "ERROR 1: ..." on stderr beside our one-line message (a truncated
    raster read outside rasterio's environment); route its messages to the log (-v shows them)."""
    try:
        from osgeo import gdal
    except ImportError:
        return
    gdal_log = logging.getLogger("gdal")

    def handler(err_class: int, err_no: int, message: str) -> None:
        gdal_log.info("GDAL error %d (class %d): %s", err_no, err_class, message)

    gdal.SetErrorHandler(handler)  # process-wide: tiles are read on a worker thread (Push is per thread)


def _progress(verbose: bool):
    if not verbose:
        return None

    def report(fraction: float, message: str) -> None:
        print(f"[{fraction:6.1%}] {message}", file=sys.stderr, flush=True)

    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _gdal_messages_to_log()
    try:
        _check_ranges(args)  # every option, before any work, in the terms of its flag
        model = ModelConfig(weights=args.weights, device=args.device, batch_size=args.batch_size,
                            runtime=getattr(args, "runtime", "auto"))
        if args.weights and not Path(args.weights).exists():  # before torch is imported: fails in a blink
            raise_user(f"Weights file not found: {args.weights}. Check --weights.")
        if args.command == "adapt":
            return _adapt(args, model)
        if args.command == "train":
            from model_backend.learn.training.command import run as run_train

            return run_train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "machine":
            return _machine(args)
        if args.command == "index":
            return _index(args, model)
        if args.command == "locate-flight":
            return _locate_flight(args, model)
        return _locate(args, model)
    except Cancelled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("error: Interrupted; finished index chunks were kept and will be reused.", file=sys.stderr)
        return EXIT_CANCELLED
    except CdiktError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _adapt(args: argparse.Namespace, model: ModelConfig) -> int:
    """Prints one JSON object: the before/after validation figures, the new model and what was trained."""
    from model_backend.learn.labels import read_labels

    if args.epochs is not None and args.epochs < 1:
        raise_user(f"--epochs must be at least 1, got {args.epochs}.")
    request = AdaptRequest(args.raster, args.labels, args.out, model, cache_dir=args.cache_dir,
                           photos=tuple(args.photos), flight_photos=args.flight_photos, epochs=args.epochs,
                           look=args.look, seed=args.seed)
    read_labels(args.labels)  # a bad labels file fails before torch is imported

    from model_backend.learn.adapt import adapt_model

    result = adapt_model(request, progress=_progress(args.verbose))
    print(result.json_line(), flush=True)
    return 0


def _machine(args: argparse.Namespace) -> int:
    """Prints one JSON object: the processor's identity and every choice measured on it (with its figures)."""
    from model_backend.core import machine

    if args.measure:
        from model_backend.index.scoring import measured_kernels
        from model_backend.nn.embedder import EmbeddingModel

        machine.forget()
        net = EmbeddingModel.load(args.weights, device="cpu", runtime="auto")
        measured_kernels(net.meta.dim)  # a fresh process: nothing of the forgotten profile is held in memory
    print(json.dumps({**machine.profile(), "file": str(machine.profile_path())}, indent=1), flush=True)
    return 0


def _cache(args: argparse.Namespace) -> int:
    """One JSON line per entry listed (or removed), then a summary line with the totals."""
    from model_backend.index.cache import list_cache, prune_cache

    if args.prune:
        if args.max_gb is not None and args.max_gb < 0:
            raise_user(f"--max-gb must be zero or more, got {args.max_gb}.")
        max_bytes = None if args.max_gb is None else int(args.max_gb * 2**30)
        entries = prune_cache(args.cache_dir, max_bytes, args.older_than_days, dry_run=args.dry_run,
                              results=args.results)
    else:
        entries = list_cache(args.cache_dir)
    for e in entries:
        print(json.dumps(e.to_dict()), flush=True)
    total = sum(e.bytes for e in entries)
    verb = "would remove" if args.prune and args.dry_run else "removed" if args.prune else "holds"
    print(json.dumps({"summary": f"{verb} {len(entries)} entries, {total / 2**20:.1f} MB", "entries": len(entries),
                      "bytes": total}), flush=True)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from model_backend.bench.evaluate import evaluate_layout

    result = evaluate_layout(args.layout, args.data, weights=args.weights, height=args.height,
                             batch_size=args.batch_size, device=args.device, progress=_progress(args.verbose))
    print(json.dumps(result), flush=True)
    return 0


def _index(args: argparse.Namespace, model: ModelConfig) -> int:
    from model_backend.geo.raster import open_raster
    from model_backend.geo.tiling import make_grid

    tiling = TilingConfig(footprint_m=args.footprint_m, stride=args.stride)
    make_grid(open_raster(args.raster), tiling)  # bad raster or footprint: fail before importing the model

    from model_backend.core.dist import env_world_size

    if env_world_size() > 1:  # started by torchrun: this rank embeds its share, rank 0 merges
        return _index_sharded(args, tiling, model)

    from model_backend.index.build import index_raster

    done = index_raster(IndexRequest(args.raster, tiling, model, cache_dir=args.cache_dir, ann=args.ann),
                        progress=_progress(args.verbose))
    idx = done.index
    print(json.dumps({"raster": args.raster, "index": str(idx.folder), "tiles": idx.n_tiles,
                      "footprint_m": idx.grid.footprint_m, "seconds": idx.manifest.get("seconds"),
                      "ann": done.ann_path}))
    return 0


def _index_sharded(args: argparse.Namespace, tiling: TilingConfig, model: ModelConfig) -> int:
    from model_backend.core.dist import current_shard, shutdown
    from model_backend.index.ann import ensure_ann
    from model_backend.index.sharded import index_sharded

    try:
        idx = index_sharded(args.raster, tiling, model, cache_dir=args.cache_dir, progress=_progress(args.verbose))
        shard = current_shard()
        if shard.is_main and idx is not None:
            print(json.dumps({"raster": args.raster, "index": str(idx.folder), "tiles": idx.n_tiles,
                              "footprint_m": idx.grid.footprint_m, "seconds": idx.manifest.get("seconds"),
                              "world_size": shard.world, "ann": ensure_ann(idx, args.ann)}), flush=True)
    finally:
        shutdown()
    return 0


def _locate_checks(args: argparse.Namespace) -> tuple[TilingConfig, QueryConfig]:
    """Everything `locate` and `locate-flight` can check without the model (or torch) fails first, in a second."""
    from model_backend.geo.raster import open_raster
    from model_backend.geo.tiling import cells_per_tile, make_grid

    if args.footprint_m is not None and args.footprint_m <= 0:
        raise_user(f"--footprint-m must be positive, got {args.footprint_m}.")
    if not 0.0 <= args.footprint_tolerance <= 1.0:  # also refuses nan
        raise_user(f"--footprint-tolerance must be from 0 to 1 (e.g. 0.3 for ±30 %), got {args.footprint_tolerance}.")
    if args.prior_radius_m is not None and not args.prior_radius_m > 0:
        raise_user(f"--prior-radius-m must be a positive number of metres, got {args.prior_radius_m}.")
    info = open_raster(args.raster)
    tiling = TilingConfig(stride=args.stride)
    cells_per_tile(args.stride)
    if args.footprint_m is not None:
        make_grid(info, replace(tiling, footprint_m=args.footprint_m))  # too large, too small, too many tiles
    return tiling, QueryConfig(top_k=args.top_k, rotations=args.rotations, footprint_m=args.footprint_m,
                               footprint_tolerance=args.footprint_tolerance,
                               structure=(args.command == "locate") if args.structure is None else args.structure)


def _locate_flight(args: argparse.Namespace, model: ModelConfig) -> int:
    """One JSON line per photo, in flight order (best_* = the track's choice), then a summary line."""
    tiling, query = _locate_checks(args)
    request = FlightRequest(args.raster, tuple(args.photos), args.out, tiling=tiling, query=query, model=model,
                            cache_dir=args.cache_dir, verify=args.verify, prior_radius_m=args.prior_radius_m,
                            states=args.states, max_speed_m_s=args.max_speed, interval_s=args.interval_s,
                            use_gps=args.use_gps, motion=args.motion, log=args.log)
    from model_backend.locate.flight.order import list_photos

    list_photos(list(args.photos))  # no photos at all: fail before torch
    if args.log and not Path(args.log).is_file():
        raise_user(f"Flight log not found: {args.log}. Check --log.")

    from model_backend.locate.flight.run import locate_flight

    res = locate_flight(request, progress=_progress(args.verbose))
    for message in res.failed:
        print(f"error: {message}", file=sys.stderr)
    for line in res.lines:
        print(json.dumps(line), flush=True)
    flagged = sum(line["flag"] == "outlier" for line in res.lines)
    print(json.dumps({"flight": len(res.lines), "order": res.order_source, "outliers": flagged,
                      "failed": len(res.failed), "reused": res.reused, "gpkg": res.gpkg_path, "csv": res.csv_path,
                      "seconds": round(res.seconds, 2), "decode_seconds": round(res.decode_seconds, 4)}), flush=True)
    return EXIT_USER_ERROR if res.failed else 0


def _locate(args: argparse.Namespace, model: ModelConfig) -> int:
    tiling, query = _locate_checks(args)
    failures = 0
    photos = []
    for photo in args.photos:
        try:
            _check_photo(photo)
        except CdiktError as exc:
            if len(args.photos) == 1:
                raise
            print(f"error: {photo}: {exc}", file=sys.stderr)
            failures += 1
            continue
        photos.append(photo)
    if not photos:
        return EXIT_USER_ERROR

    from model_backend.core.paths import output_names
    from model_backend.locate.pipeline import locate
    from model_backend.nn.embedder import EmbeddingModel

    net = EmbeddingModel.load(model.weights, model.device, model.threads, model.runtime)
    base = LocateRequest(args.raster, "", args.out, tiling=tiling, model=model, cache_dir=args.cache_dir,
                         query=query, verify=args.verify, prior_radius_m=args.prior_radius_m)
    for photo, name in zip(photos, output_names(photos)):  # two DJI_0001.JPG of two flights: two sets
        try:
            res = locate(replace(base, photo=photo, out_name=name), progress=_progress(args.verbose), embedder=net)
        except Cancelled:
            raise
        except CdiktError as exc:
            if len(args.photos) == 1:
                raise
            print(f"error: {photo}: {exc}", file=sys.stderr)
            failures += 1
            continue
        print(json.dumps(res.json_line()), flush=True)
    return EXIT_USER_ERROR if failures else 0


def _check_photo(photo: str) -> None:
    """Cheap up-front check (the file exists and its header is an image's); decoding problems
    are still reported per photo by `load_photo`, without stopping the other photos."""
    from PIL import Image, UnidentifiedImageError

    p = Path(photo)
    if not p.is_file():
        raise_user(f"Photo not found: {p}. Check the path.")
    try:
        with Image.open(p):
            pass
    except UnidentifiedImageError:
        raise_user(f"{p.name} is not an image file; pick a JPEG, PNG or TIFF photo.")
    except Image.DecompressionBombError:
        raise_user(f"{p.name} has too many pixels to load safely; downscale it first.")
    except OSError as exc:
        raise_user(f"Cannot read {p.name} ({exc.strerror or type(exc).__name__}); check the file.")


def raise_user(message: str) -> None:
    from model_backend.core.errors import InputError

    raise InputError(message)
