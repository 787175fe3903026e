"""Locate a flight: each photo as `locate` does, then the sequence decoded as one track.

Every photo is located alone first (the same files as `locate`, with `states` candidates), and what
the decoder needs is kept beside its outputs as `<name>.flight.json`. That record is the unit of
resumption: a rerun with the same raster, model and settings reuses it, so Cancel (or a crash)
loses at most the photo in progress. The decoding itself takes milliseconds and always reruns.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from model_backend.core.atomic import atomic_write_bytes
from model_backend.core.errors import Cancelled, CdiktError, InputError
from model_backend.core.paths import output_names
from model_backend.core.requests import FlightRequest
from model_backend.geo.geodesy import from_wgs84, metres_per_unit, to_wgs84
from model_backend.geo.raster import open_raster
from model_backend.index.build import CancelFn, ProgressFn
from model_backend.locate.flight.decode import DecodeConfig, Decoded, Move, Observation, decode
from model_backend.locate.flight.order import FlightPhoto, order_flight
from model_backend.locate.flight.outputs import write_flight_csv, write_flight_gpkg
from model_backend.locate.pipeline import locate_photo, prepare_out_dir
from model_backend.nn.embedder import EmbeddingModel

log = logging.getLogger(__name__)

EARTH_M = 6_371_008.8
RECORD = ".flight.json"
RECORD_FORMAT = 2
"""Bumped when a record's content changes: older records are redone, not misread."""
UNCERTAIN = 0.5
"""A track choice whose posterior is below this is flagged 'uncertain'."""


@dataclass
class FlightResult:
    lines: list[dict[str, Any]]
    """One locate-style JSON line per photo, in flight order, with the track's choice as best_*."""
    gpkg_path: str
    csv_path: str
    order_source: str
    """'time' (EXIF or log clock) or 'name'."""
    reused: int
    """Photos taken from an earlier run's records (resumed)."""
    seconds: float
    decode_seconds: float
    decoded: Decoded
    failed: list[str]
    """'photo: reason' for each photo that could not be located (left out of the track)."""
    index_dirs: list[str] = field(default_factory=list)
    """Every index the photos were located on (a cache limit keeps them)."""


def settings_key(request: FlightRequest, raster_stat: tuple[int, int]) -> str:
    """What a photo's record depends on; a record made under other settings is redone, not reused."""
    what = {"format": RECORD_FORMAT, "raster": str(Path(request.raster).resolve()), "raster_stat": list(raster_stat),
            "tiling": asdict(request.tiling), "query": asdict(request.query), "weights": request.model.weights,
            "verify": request.verify, "prior_radius_m": request.prior_radius_m, "states": request.states}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(res, photo: FlightPhoto, key: str, scores_file: Path) -> dict[str, Any]:
    """What the decoder needs of a located photo: its candidates (verified where verification ran), its
    index, and where its every tile's score was saved (the track may need a place a better one hid)."""
    cands = [{"rank": c.rank, "x": c.x, "y": c.y, "lon": c.lon, "lat": c.lat, "score": c.score,
              "tile_x": c.tile_x if c.tile_x is not None else c.x, "tile_y": c.tile_y if c.tile_y is not None else c.y,
              "verified": bool(c.verified), "confidence": c.confidence or 0.0, "heading_deg": c.heading_deg,
              "polygon": [[float(x), float(y)] for x, y, *_ in c.polygon]} for c in res.candidates]
    return {"key": key, "photo": str(Path(photo.path).absolute()), "photo_stat": _stat(photo.path),
            "model_sha256": res.model_sha256,
            "footprint_m": res.footprint_m, "candidates": cands, "line": res.json_line(),
            "index_dir": res.index_dir, "index_dirs": list(res.index_dirs), "scores": str(scores_file.absolute()),
            "outputs": [res.heatmap_path, res.geojson_path, res.gpkg_path, str(scores_file.absolute())]}


MOTION_FILE = "flight.motion.json"
MOTION_FORMAT = 4


def measure_motion(photos: list[FlightPhoto], out: Path, cancel: CancelFn | None = None,
                   progress: ProgressFn | None = None) -> list[dict[int, dict[str, Any] | None]]:
    """Per photo, the moves measured from earlier photos by gap: {1: move, None (no overlap) or UNKNOWN
    (one photo has nothing to match)}, and {2: ...} too where the photo did not match the one before (a
    stray photo between two that do overlap then shows as a measured skip). Cached in
    `flight.motion.json` by the pair's paths, so a rerun matches only new pairs."""
    from model_backend.geo.exif import load_photo
    from model_backend.locate.flight.motion import features, relative_motion

    path = out / MOTION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cache = doc["pairs"] if doc.get("format") == MOTION_FORMAT else {}
    except (OSError, ValueError, KeyError, AttributeError):
        cache = {}
    feats: dict[int, Any] = {}

    def feature(i: int):
        if i not in feats:
            try:
                feats[i] = features(load_photo(photos[i].path))
            except CdiktError:
                feats[i] = None
            for old in [k for k in feats if k < i - 2]:
                del feats[old]
        return feats[i]

    moves: list[dict[int, dict[str, Any] | None]] = [{}]
    dirty = 0
    for i in range(1, len(photos)):
        measured: dict[int, dict[str, Any] | None] = {}
        for gap in (1, 2):
            if gap > i or (gap == 2 and is_move(measured.get(1))):
                break
            pair = "|".join(f"{Path(q.path).absolute()}:{':'.join(map(str, _stat(q.path)))}"
                            for q in (photos[i - gap], photos[i]))
            if pair not in cache:
                if cancel and cancel():
                    break
                fa, fb = feature(i - gap), feature(i)
                m = relative_motion(fa, fb) if fa is not None and fb is not None else None
                if m is not None:
                    cache[pair] = asdict(m)
                elif fa is not None and fb is not None and not (fa.textured and fb.textured):
                    cache[pair] = UNKNOWN  # nothing to match in one of them: no evidence either way
                else:
                    cache[pair] = None
                dirty += 1
                if dirty % 20 == 0:
                    atomic_write_bytes(path, json.dumps({"format": MOTION_FORMAT, "pairs": cache}).encode("utf-8"))
            measured[gap] = cache[pair]
        if progress:
            progress(i / len(photos), f"Matching photo {i + 1} with the ones before")
        moves.append(measured)
    if dirty:
        atomic_write_bytes(path, json.dumps({"format": MOTION_FORMAT, "pairs": cache}).encode("utf-8"))
    moves += [{}] * (len(photos) - len(moves))
    return moves


def query_headings(photo: FlightPhoto, rotations: int) -> np.ndarray:
    """The photo heading (its top, clockwise from north) each query rotation stands for.

    A photo with an EXIF yaw is queried once, north-up: its heading is the yaw. Otherwise query i is
    the photo turned counter-clockwise by 360 i / R, and a north-up tile matching it means the
    photo's top pointed at -360 i / R."""
    if photo.priors.yaw_deg is not None:
        return np.array([photo.priors.yaw_deg % 360.0])
    r = max(1, rotations)
    return (-360.0 * np.arange(r) / r) % 360.0


def save_scores(path: Path, scores, headings: np.ndarray) -> None:
    """Every tile's score (fp16) and the heading it was best at, beside the photo's outputs."""
    buf = io.BytesIO()
    which = scores.heading if scores.heading is not None else np.zeros(len(scores), np.int16)
    tile_heading = np.where(which >= 0, headings[np.clip(which, 0, len(headings) - 1)], np.nan)
    np.savez(buf, values=scores.values.astype(np.float16), heading=tile_heading.astype(np.float16))
    atomic_write_bytes(path, buf.getvalue())


UNKNOWN: dict[str, Any] = {"unknown": True}
"""A pair whose match says nothing (one photo is featureless): neither a move nor evidence of no overlap."""


def is_move(m: dict[str, Any] | None) -> bool:
    """Whether a measured pair is a move (not None: no overlap; not UNKNOWN)."""
    return m is not None and not m.get("unknown")


HUB_MIN_PHOTOS = 5
"""A flight needs this many photos on one index before a tile's typical score is its median over them."""
HUB_SAMPLE = 128
"""At most about this many photos (evenly spaced) give a tile's typical score."""


def flight_states(records: list[dict[str, Any]], states: int,
                  gps_lonlat: list[tuple[float, float] | None] | None = None) -> list[list[dict[str, Any]]]:
    """Each photo's places to choose among, with scores corrected for hubs.

    Some tiles look like everything (a generic field, a blur of texture) and score near the top for
    most photos of a flight; left alone, a track can hop between such hubs and never move. A tile's
    typical score over the flight (its median over the photos on the same index: the few photos that
    truly show it do not move a median) is subtracted from each photo's score, as cross-domain
    similarity local scaling does. Each photo's places are then its candidates and its `states` best
    tiles by corrected score, every one with `z`: the corrected score in standard deviations above
    the photo's median tile. Flights of fewer than HUB_MIN_PHOTOS photos per index are not corrected.
    A photo with a GPS position (`gps_lonlat`) also gets every tile within one footprint of it: the
    prior can only pick the true place if that place is among the states.
    """
    from model_backend.index.store import TileIndex

    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec["index_dir"], []).append(i)
    out: list[list[dict[str, Any]]] = [[] for _ in records]
    for folder, members in groups.items():
        idx = TileIndex.open(Path(folder))
        xs, ys = idx.grid.centres(idx.cols, idx.rows)
        xs, ys = np.atleast_1d(xs).astype(np.float64), np.atleast_1d(ys).astype(np.float64)
        to_ll = to_wgs84(idx.grid.crs_wkt)
        at = {xy: k for k, xy in enumerate(zip(xs.tolist(), ys.tolist()))}  # tile centre -> position
        saved = [np.load(records[i]["scores"]) for i in members]
        values = [f["values"].astype(np.float32) for f in saved]
        headings = [f["heading"].astype(np.float32) for f in saved]
        hub = np.zeros(idx.n_tiles, np.float32)
        if len(members) >= HUB_MIN_PHOTOS:
            # An even sample of the flight's photos: a median of 128 is as robust as one of 500, at a quarter
            # of the cost (500 photos x 10^5 tiles: 1.2 s for all of them).
            stack = np.stack(values[::max(1, -(-len(values) // HUB_SAMPLE))])
            with np.errstate(all="ignore"):
                for a in range(0, idx.n_tiles, 16384):
                    block = stack[:, a:a + 16384]
                    hub[a:a + 16384] = np.nan_to_num(np.nanmedian(block, axis=0)) if np.isnan(block).any() \
                        else np.median(block, axis=0)
        for i, v, hd in zip(members, values, headings):
            adj = v - hub
            finite = np.isfinite(adj)
            med = _median(adj[finite]) if finite.any() else 0.0
            std = max(float(adj[finite].std()) if finite.any() else 0.0, 1e-6)
            adj_sorted = np.where(finite, adj, -np.inf)
            k = min(states, int(finite.sum()))
            top = np.argpartition(-adj_sorted, k - 1)[:k] if 0 < k < adj.size else np.flatnonzero(finite)
            top = top[np.argsort(-adj_sorted[top], kind="stable")]
            gps = gps_lonlat[i] if gps_lonlat else None
            if gps is not None:
                gx, gy = from_wgs84(idx.grid.crs_wkt).transform(*gps)
                fp = records[i]["footprint_m"] / max(metres_per_unit(idx.grid.crs_wkt, gx, gy)[0], 1e-12)
                near = np.flatnonzero(finite & (np.hypot(xs - gx, ys - gy) <= fp))
                top = np.concatenate([top, near[~np.isin(near, top)]])
            lons, lats = (np.atleast_1d(a) for a in to_ll.transform(xs[top], ys[top]))
            places = []
            for c in records[i]["candidates"]:
                t = at.get((c["tile_x"], c["tile_y"]))
                if t is None:  # a centre computed another way: the nearest tile
                    t = int(np.argmin((xs - c["tile_x"]) ** 2 + (ys - c["tile_y"]) ** 2))
                places.append({**c, "z": (float(adj[t]) - med) / std if finite[t] else 0.0,
                               "heading_deg": c["heading_deg"] if c["verified"] else _opt(hd[t])})
            for j, t in enumerate(top):
                c, r = int(idx.cols[t]), int(idx.rows[t])
                places.append({"rank": None, "x": float(xs[t]), "y": float(ys[t]), "lon": float(lons[j]),
                               "lat": float(lats[j]), "score": float(v[t]), "z": (float(adj[t]) - med) / std,
                               "verified": False, "confidence": 0.0, "heading_deg": _opt(hd[t]),
                               "polygon": None, "tile": (idx.grid, c, r)})  # made only for the place chosen
            out[i] = places
    return out


MEDIAN_SAMPLE = 16384
"""A photo's median tile is taken over an even sample of this many tiles: on a 10^5-tile index the exact
median cost 3 ms a photo, and a sample's is off by ~1 % of a standard deviation."""


def _median(values: np.ndarray) -> float:
    step = max(1, values.size // MEDIAN_SAMPLE)
    return float(np.median(values[::step]))


def _polygon(place: dict[str, Any]) -> list[list[float]]:
    """A place's footprint ring: its own (candidates, verified ones included), else its tile's."""
    if place.get("polygon") is not None:
        return place["polygon"]
    grid, c, r = place["tile"]
    return [[float(x), float(y)] for x, y in grid.polygon(c, r)]


def _stat(path: str) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _load_record(path: Path, key: str, photo: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if rec.get("key") != key or rec.get("photo") != str(Path(photo).absolute()) or not rec.get("candidates") \
            or rec.get("photo_stat") != _stat(photo) \
            or not rec.get("index_dir") or not Path(rec["index_dir"]).is_dir() or not rec.get("scores"):
        return None
    if not all(Path(p).is_file() for p in rec.get("outputs", [])):
        return None
    return rec


def _frame(records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """A local metric frame (lon0, lat0, metres per degree of lon) shared by the whole flight."""
    lons = [r["candidates"][0]["lon"] for r in records]
    lats = [r["candidates"][0]["lat"] for r in records]
    lon0, lat0 = float(np.median(lons)), float(np.median(lats))
    return lon0, lat0, math.radians(1.0) * EARTH_M * math.cos(math.radians(lat0))


def _metres(frame: tuple[float, float, float], lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon0, lat0, m_lon = frame
    return (np.asarray(lon) - lon0) * m_lon, (np.asarray(lat) - lat0) * math.radians(1.0) * EARTH_M


def _opt(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def observations(places: list[list[dict[str, Any]]], records: list[dict[str, Any]], photos: list[FlightPhoto],
                 use_gps: bool, use_time: bool, moves: list[dict[int, dict[str, Any] | None]] | None = None
                 ) -> list[Observation]:
    frame = _frame(records)
    t0 = min((p.taken_s for p in photos if p.taken_s is not None), default=0.0)
    out = []
    for k, (c, rec, ph) in enumerate(zip(places, records, photos)):
        measured = moves[k] if moves else {}
        known = {g: Move(m["shift"] * records[k - g]["footprint_m"], m["direction_deg"], m["rotation_deg"])
                 for g, m in measured.items() if is_move(m) and k - g >= 0}
        unmatched = frozenset(g for g, m in measured.items() if m is None)
        after = moves[k + 1] if moves and k + 1 < len(moves) else {}
        stray = 1 in unmatched and 1 in after and after[1] is None and is_move(after.get(2))
        xs, ys = _metres(frame, np.array([p["lon"] for p in c]), np.array([p["lat"] for p in c]))
        verified = np.array([p["confidence"] if p["verified"] else 0.0 for p in c])
        heads = np.array([p["heading_deg"] if p["heading_deg"] is not None else np.nan for p in c], np.float64)
        gps = None
        if use_gps and ph.priors.lat is not None and ph.priors.lon is not None:
            gx, gy = _metres(frame, np.array([ph.priors.lon]), np.array([ph.priors.lat]))
            gps = (float(gx[0]), float(gy[0]))
        out.append(Observation(xs, ys, np.array([p["z"] for p in c]), rec["footprint_m"],
                               time_s=(ph.taken_s - t0) if use_time and ph.taken_s is not None else None,
                               verified=verified if verified.any() else None,
                               heading_deg=heads if np.isfinite(heads).any() else None, gps_xy=gps, moves=known,
                               unmatched=unmatched, stray=stray))
    return out


def locate_flight(request: FlightRequest, *, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                  embedder: EmbeddingModel | None = None) -> FlightResult:
    """Locate every photo of the flight (resuming), decode the track, write flight.gpkg and flight.csv."""
    t_start = time.perf_counter()
    info = open_raster(request.raster)
    photos, order_source = order_flight(list(request.sources), request.log)
    out = prepare_out_dir(request.out_dir)
    st = Path(request.raster).stat()
    key = settings_key(request, (st.st_size, int(st.st_mtime)))
    names = output_names([p.path for p in photos])
    records: list[dict[str, Any]] = []
    located: list[FlightPhoto] = []
    failed: list[str] = []
    reused = 0
    net = embedder
    n = len(photos)
    for i, (ph, name) in enumerate(zip(photos, names)):
        if cancel and cancel():
            raise Cancelled()
        rec_path = out / f"{name}{RECORD}"
        rec = _load_record(rec_path, key, ph.path)
        if rec is not None:
            reused += 1
        else:
            if net is None:
                if progress:
                    progress(0.0, "Loading model…")
                net = EmbeddingModel.load(request.model.weights, request.model.device, request.model.threads,
                                          request.model.runtime)

            def sub(f: float, msg: str, i: int = i, label: str = Path(ph.path).name) -> None:
                if progress:
                    progress((i + f) / n, f"Photo {i + 1} of {n} ({label}): {msg}")

            try:
                res = locate_photo(request.raster, ph.path, str(out), tiling=request.tiling, query=request.query,
                                   model=request.model, cache_dir=request.cache_dir, progress=sub, cancel=cancel,
                                   embedder=net, verify=request.verify, prior_radius_m=request.prior_radius_m,
                                   out_name=name)
            except Cancelled:
                raise
            except CdiktError as exc:  # one unreadable photo must not cost the flight: it is left out, and said
                log.warning("%s: %s", ph.path, exc)
                failed.append(f"{ph.path}: {exc}")
                continue
            scores_file = out / f"{name}.scores.npz"
            save_scores(scores_file, res.scores, query_headings(ph, request.query.rotations))
            rec = _record(res, ph, key, scores_file)
            atomic_write_bytes(rec_path, json.dumps(rec).encode("utf-8"))
        records.append(rec)
        located.append(ph)
        if progress:
            progress((i + 1) / n, f"Photo {i + 1} of {n} located")

    if not records:
        raise InputError(f"No photo of the flight could be located; the first: {failed[0]}")
    photos = located
    n = len(photos)
    cfg = DecodeConfig(max_speed_m_s=request.max_speed_m_s, default_interval_s=request.interval_s)
    moves = measure_motion(photos, out, cancel,
                           (lambda f, m: progress(0.99, m)) if progress else None) if request.motion else None
    if cancel and cancel():
        raise Cancelled()
    t_dec = time.perf_counter()
    gps = [(p.priors.lon, p.priors.lat) if request.use_gps and p.priors.lat is not None and p.priors.lon is not None
           else None for p in photos]
    places = flight_states(records, request.states, gps)
    decoded = decode(observations(places, records, photos, request.use_gps, order_source == "time", moves), cfg)
    decode_s = time.perf_counter() - t_dec
    lines, rows, track = _assemble(places, records, photos, decoded, info.crs_wkt)
    t0 = min((p.taken_s for p in photos if p.taken_s is not None), default=None)
    times = [p.taken_s for p in photos]
    on_track = [r for r in rows if r["flag"] != "outlier"]
    track_props = {
        "photos": n, "on_track": len(on_track), "outliers": n - len(on_track),
        "start_time": _iso(times[0]), "end_time": _iso(times[-1]), "order": order_source,
        "length_m": round(float(sum(r["step_m"] or 0.0 for r in on_track)), 1),
    }
    gpkg = write_flight_gpkg(out / "flight.gpkg", info.crs_wkt, rows,
                             [(x, y, (t - t0) if (t is not None and t0 is not None) else float(k))
                              for k, (x, y, t) in enumerate(track)], track_props)
    csv_path = write_flight_csv(out / "flight.csv", rows)
    return FlightResult(lines, gpkg, csv_path, order_source, reused, time.perf_counter() - t_start, decode_s, decoded,
                        failed, sorted({d for rec in records for d in rec.get("index_dirs", [rec["index_dir"]])}))


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4]


def _assemble(places: list[list[dict[str, Any]]], records: list[dict[str, Any]], photos: list[FlightPhoto],
              decoded: Decoded, crs_wkt: str):
    from model_backend.geo.geodesy import ground_distance

    lines, rows, track = [], [], []
    prev: tuple[float, float] | None = None
    for k, (rec, ph, choice, conf) in enumerate(zip(records, photos, decoded.choice, decoded.confidence)):
        own = places[k][0]
        chosen = places[k][choice] if choice >= 0 else own
        rank = 1 + sum(c["score"] > chosen["score"] for c in places[k]) if choice >= 0 else None
        flag = "outlier" if choice < 0 else ("uncertain" if conf < UNCERTAIN else "")
        step = None
        if choice >= 0:
            if prev is not None:
                step = round(ground_distance(crs_wkt, prev[0], prev[1], chosen["x"], chosen["y"]), 1)
            prev = (chosen["x"], chosen["y"])
            track.append((chosen["x"], chosen["y"], ph.taken_s))
        line = dict(rec["line"])
        line.update(
            best_x=round(chosen["x"], 3), best_y=round(chosen["y"], 3), best_lon=round(chosen["lon"], 8),
            best_lat=round(chosen["lat"], 8), score=round(chosen["score"], 5),
            independent_x=round(own["x"], 3), independent_y=round(own["y"], 3),
            independent_lon=round(own["lon"], 8), independent_lat=round(own["lat"], 8),
            order=k, time=_iso(ph.taken_s), track_rank=rank,
            track_confidence=round(conf, 4), flag=flag, step_m=step, verified=bool(chosen["verified"]),
            confidence=round(chosen["confidence"], 4) if chosen["verified"] else line.get("confidence"),
            heading_deg=chosen["heading_deg"],
            footprint_wkt="POLYGON ((" + ", ".join(f"{x:.3f} {y:.3f}" for x, y in _polygon(chosen)) + "))",
        )
        lines.append(line)
        rows.append({
            "order": k, "photo": rec["photo"], "time": _iso(ph.taken_s), "time_s": ph.taken_s,
            "chosen_rank": rank, "x": chosen["x"], "y": chosen["y"],
            "lon": chosen["lon"], "lat": chosen["lat"], "score": chosen["score"], "track_confidence": round(conf, 4),
            "flag": flag, "verified": bool(chosen["verified"]), "independent_x": own["x"], "independent_y": own["y"],
            "independent_score": own["score"], "step_m": step, "footprint_m": rec["footprint_m"],
            "gps_distance_m": rec["line"].get("gps_distance_m"),
        })
    return lines, rows, track
