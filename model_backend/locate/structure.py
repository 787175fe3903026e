"""Re-ranking candidates by the shape of the ground: field edges, roads and shorelines, not their colour.

An embedding learned on one season ranks the right tile first only when the photo looks like the map;
across years (other crops, another season, other water levels) colour and texture change while the
lines between fields, roads and shores stay. Those lines are compared here. Each image becomes a field
of edge orientations in the doubled-angle form z = |g| e^{2i·phi} (g the grey gradient), which is the
same whether a road is darker or brighter than its verge (a field that turned from green to brown
flips the sign of its edges, doubling the angle forgets the sign), divided by the local gradient
strength (so a faint edge in a bland area counts as much as a strong one in a busy one). The photo's
field, turned through every heading and a few scales, is correlated (normalised, complex, by FFT)
with the map's field around each of the embedding's best candidates; a candidate's score is the best
correlation within `search` footprints of its centre, and the place, heading and scale that reached
it move the candidate there.

Measured (bench part `cross_year`): NAIP North Dakota, map of one year, views simulated from another,
ImageNet embedding, all six year pairs: top-1 rises from 18 % to 35 % (2015/2020 pairs: to 43-63 %).
The embedding still chooses where to look (its top candidates) and keeps its say where it is sure
(`StructureConfig.embedding_weight`); a candidate whose structure score is no better than chance keeps
its embedding order.

Cost: coarse to fine FFT correlations, batched in torch, on two cores: ~1.3 s a photo with no size
given, ~2.8 s with one (a longer size ladder, see `StructureConfig.upward`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from model_backend.geo.geodesy import to_wgs84
from model_backend.geo.raster import RasterInfo
from model_backend.geo.reader import compute_stretch
from model_backend.locate.candidates import Candidate
from model_backend.locate.verify import read_grey


@dataclass(frozen=True)
class StructureConfig:
    """Settings of the structure re-rank; the defaults are what bench part `cross_year` measured."""

    top_k: int = 20
    """Embedding candidates re-scored (the right place is among the top 20 for ~95 % of cross-year views)."""
    photo_px: int = 80
    """The photo's short side at the working resolution (the map is read at footprint / photo_px metres
    per pixel): enough for field boundaries and roads, small enough for dozens of FFTs per candidate."""
    search: float = 0.5
    """How far from a candidate's centre its best placement may lie, in footprints (a tile's centre is
    within half a stride of the truth; more lets a candidate steal its neighbour's place)."""
    headings: int = 24
    """Headings tried when the photo's is unknown (every 15 degrees)."""
    heading_spread_deg: float = 15.0
    """With a known heading (EXIF), the headings tried are it and it +/- this (EXIF yaw is good to ~10 deg)."""
    span: float = 1.2
    """Ground sizes tried when no size was given: from footprint / span to footprint x span."""
    upward: float = 1.25
    """With a size given, the sizes tried run from its tolerance's bottom to its top x this: an analyst's
    guess off by the whole tolerance still leaves the photo's own size (tilted and scattered a fifth either
    way) in reach; with `size_bias` the extra large sizes cost no accuracy at the true size (bench
    `cross_year`, footprint given x0.75)."""
    scale_step: float = 1.1
    """Ratio between consecutive sizes tried (the fit of the edges halves about 10 % off the true size)."""
    size_bias: float = 0.5
    """Each size's correlation is weighed by (size / footprint) ** size_bias before sizes are compared: a
    smaller template fits some wrong window by chance more often (fewer pixels, more noise), so without it
    a ladder reaching well below the true size placed photos at wrong places (cross-year dev views with the
    footprint given x0.75: 25 % found without, 36 % with 0.5)."""
    smooth_px: float = 1.0
    """Gaussian blur before the gradient, in working pixels (noise and JPEG blocks are not structure)."""
    norm_px: float = 6.0
    """Neighbourhood, in working pixels, over which edge strength is normalised."""
    refine: int = 3
    """(heading, size) pairs that the half-resolution pass keeps for the full-resolution one."""
    embedding_weight: float = 0.03
    """Weight of the embedding's evidence (its score in standard deviations above the median tile) added to
    the structure score: where the embedding is sure (the map's own season, a tile 10 deviations above the
    rest) it keeps its choice; where it is not (other years: the right tile 2-3 deviations up, like many
    others) the structure decides. Chosen on 40 same-date views each of Manila and the Netherlands (seed 11,
    which the `accuracy` part also draws: its figures there are partly tuning data) and on cross-year views
    of seed 102 (the `cross_year` part draws 300+)."""
    min_score: float = 0.0
    """A candidate whose best correlation is at or below this keeps its embedding score and order."""


DEFAULT_STRUCTURE = StructureConfig()


@dataclass
class Placement:
    """Where the photo's edge structure fits best near one candidate."""

    score: float
    """Normalised correlation of edge orientations weighed by size (`StructureConfig.size_bias`; 1 at the
    footprint searched): 0 unrelated, about 0.1-0.4 the right place."""
    x: float
    """Photo centre, raster CRS."""
    y: float
    heading_deg: float
    """Direction of the photo's top edge, clockwise from grid north."""
    scale: float
    """Ground size found, as a multiple of the footprint searched."""


def scale_ladder(span: float, step: float, upward: float = 1.0) -> tuple[float, ...]:
    """Sizes from 1/span to span x upward (multiples of the footprint), evenly spaced in log, at most `step`
    apart; the footprint itself is always among them."""
    span, upward = max(1.0, float(span)), max(1.0, float(upward))
    if span * upward == 1.0:
        return (1.0,)
    down = max(1, math.ceil(math.log(span) / math.log(step) - 1e-9)) if span > 1.0 else 0
    up = max(1, math.ceil(math.log(span * upward) / math.log(step) - 1e-9))
    return tuple(round(span ** (i / down), 4) for i in range(-down, 0)) + tuple(
        round((span * upward) ** (i / up), 4) for i in range(up + 1))


def edge_field(grey: np.ndarray, smooth_px: float, norm_px: float, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) complex64 doubled-angle edge orientation, locally normalised; 0 outside `valid`."""
    g = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), smooth_px) if smooth_px > 0 else grey.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    z = (gx + 1j * gy).astype(np.complex64)
    z = z * z / (np.abs(z) + 1e-3)
    if valid is not None:
        # The edge of nodata is a strong false line: drop a band of pixels along it.
        keep = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        z = np.where(keep, z, 0).astype(np.complex64)
    power = cv2.GaussianBlur((z.real ** 2 + z.imag ** 2).astype(np.float32), (0, 0), norm_px)
    return (z / np.sqrt(power + 1e-6 + 1e-3 * float(power.mean()))).astype(np.complex64)


@dataclass
class _Level:
    """The photo's turned fields at one working resolution, ready to correlate with a map window of `side`."""

    px: int
    """The photo's short side at this level, in pixels (the map is read at footprint / px metres per pixel)."""
    side: int
    fields: list[np.ndarray]
    """Each template's edge field (its own size)."""
    t_norm: torch.Tensor
    area: torch.Tensor
    """(K,) pixels each template covers."""
    allowed: torch.Tensor
    """(K, side, side): offsets whose template lies in the window and whose centre is within the search."""
    centres: list[tuple[float, float]]
    """Each template's centre (x, y) from its top-left corner, in pixels."""
    _hat: dict[int, torch.Tensor] = field(default_factory=dict)

    def t_hat(self, kinds: list[int]) -> torch.Tensor:
        """(len(kinds), side, side) conjugate FFTs of those templates, zero-padded; each computed once."""
        todo = [k for k in kinds if k not in self._hat]
        if todo:
            t = torch.zeros((len(todo), self.side, self.side), dtype=torch.complex64)
            for i, k in enumerate(todo):
                th, tw = self.fields[k].shape
                t[i, :th, :tw] = torch.from_numpy(self.fields[k])
            for k, hat in zip(todo, torch.conj(torch.fft.fft2(t))):
                self._hat[k] = hat
        return torch.stack([self._hat[k] for k in kinds])


class StructureMatcher:
    """Structure placements of one photo on one raster; holds the photo's turned fields and the dataset.

    Coarse to fine: every heading and size is tried on a half-resolution window (a quarter of the work),
    and the `refine` best of them again at full resolution, which places the photo."""

    def __init__(self, info: RasterInfo, photo: np.ndarray, footprint_m: float, yaw_deg: float | None = None,
                 cfg: StructureConfig = DEFAULT_STRUCTURE, dataset: rasterio.io.DatasetReader | None = None,
                 span: float | None = None, upward: float = 1.0) -> None:
        self.info, self.cfg, self.footprint_m = info, cfg, float(footprint_m)
        self.scales = scale_ladder(span or cfg.span, cfg.scale_step, upward)
        self.mx, self.my = info.gsd_x_m / abs(info.affine.a), info.gsd_y_m / abs(info.affine.e)
        self._own = dataset is None
        self.ds = dataset if dataset is not None else rasterio.open(info.path)
        self._stretch = None if info.dtype == "uint8" else compute_stretch(info)
        if yaw_deg is None:
            headings = [360.0 * i / cfg.headings for i in range(cfg.headings)]
        else:
            headings = [(yaw_deg + d) % 360.0 for d in (-cfg.heading_spread_deg, 0.0, cfg.heading_spread_deg)]
        self.kinds = [(hd, s) for s in self.scales for hd in headings]
        self._weight = torch.tensor([s ** cfg.size_bias for _, s in self.kinds], dtype=torch.float32)
        grey = cv2.cvtColor(np.ascontiguousarray(photo[..., :3]), cv2.COLOR_RGB2GRAY)
        self.fine = self._level(grey, cfg.photo_px, None)
        self.coarse = self._level(grey, cfg.photo_px // 2, self.fine.side // 2)
        self.gsd = self.footprint_m / cfg.photo_px

    def close(self) -> None:
        if self._own:
            self.ds.close()

    def __enter__(self) -> StructureMatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _level(self, grey: np.ndarray, px: int, side: int | None) -> _Level:
        """Every (heading, size) template at `px`; the window side fits the search plus the largest template
        (None: the smallest multiple of 32 that does: FFTs of sizes with small factors run several times faster)."""
        cfg = self.cfg
        f = px / cfg.photo_px
        smooth, norm = cfg.smooth_px * f, cfg.norm_px * f
        h, w = grey.shape
        fields, masks, centres = [], [], []
        sized: dict[float, np.ndarray] = {}
        for hd, s in self.kinds:
            if s not in sized:
                k = px * s / min(h, w)
                sized[s] = cv2.resize(grey, (max(8, round(w * k)), max(8, round(h * k))), interpolation=cv2.INTER_AREA)
            small = sized[s]
            sh, sw = small.shape
            # A photo whose top faces bearing hd lies on the north-up map turned clockwise by hd.
            rot = cv2.getRotationMatrix2D((sw / 2.0, sh / 2.0), -hd, 1.0)
            c, s_ = abs(rot[0, 0]), abs(rot[0, 1])
            ow, oh = int(math.ceil(sw * c + sh * s_)), int(math.ceil(sw * s_ + sh * c))
            rot[0, 2] += ow / 2.0 - sw / 2.0
            rot[1, 2] += oh / 2.0 - sh / 2.0
            img = cv2.warpAffine(small, rot, (ow, oh), flags=cv2.INTER_LINEAR, borderValue=0)
            mask = cv2.warpAffine(np.ones_like(small), rot, (ow, oh), flags=cv2.INTER_NEAREST, borderValue=0) > 0
            fields.append(edge_field(img, smooth, norm, mask))
            masks.append(cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
            centres.append((ow / 2.0, oh / 2.0))
        reach = cfg.search * px
        t_size = max(max(z.shape) for z in fields)
        if side is None:
            side = 32 * int(math.ceil((2 * reach + t_size + 4) / 32))
        allowed = torch.zeros((len(fields), side, side), dtype=torch.bool)
        rr = torch.arange(side, dtype=torch.float32)
        for k, (z, (tx, ty)) in enumerate(zip(fields, centres)):
            th, tw = z.shape
            # Offset (r, c) puts the template's top-left there and its centre at (c + tx, r + ty).
            ok = ((rr + ty - side / 2.0).abs() <= reach)[:, None] & ((rr + tx - side / 2.0).abs() <= reach)[None, :]
            ok[side - th + 1:, :] = False
            ok[:, side - tw + 1:] = False
            allowed[k] = ok
        return _Level(px, side, fields,
                      torch.tensor([float(np.sqrt((np.abs(z) ** 2).sum())) for z in fields]),
                      torch.tensor([float(m.sum()) for m in masks]), allowed, centres)

    def _read(self, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """The map's grey window centred on (cx, cy) at the fine resolution (side fine.side), its valid mask
        (False beyond the raster), and the CRS coordinates of its top-left corner."""
        info, side = self.info, self.fine.side
        half = side / 2.0
        pc, pr = ~info.affine * (cx, cy)
        sx, sy = self.gsd / info.gsd_x_m, self.gsd / info.gsd_y_m   # raster pixels per working pixel
        c0, r0 = pc - half * sx, pr - half * sy
        cc0, rr0 = max(0.0, c0), max(0.0, r0)
        cc1, rr1 = min(float(info.width), c0 + side * sx), min(float(info.height), r0 + side * sy)
        if cc1 - cc0 < 4 or rr1 - rr0 < 4:
            return None
        ox, oy = round((cc0 - c0) / sx), round((rr0 - r0) / sy)
        ow = max(1, min(side - ox, round((cc1 - cc0) / sx)))
        oh = max(1, min(side - oy, round((rr1 - rr0) / sy)))
        grey = np.zeros((side, side), np.uint8)
        valid = np.zeros((side, side), bool)
        grey[oy:oy + oh, ox:ox + ow], valid[oy:oy + oh, ox:ox + ow] = read_grey(
            self.ds, info, self._stretch, Window(cc0, rr0, cc1 - cc0, rr1 - rr0), (oh, ow))
        x0, y0 = info.affine * (c0, r0)
        return grey, valid, float(x0), float(y0)

    def _scores(self, level: _Level, grey: np.ndarray, valid: np.ndarray, kinds: list[int] | None) -> torch.Tensor:
        """(K, side, side) normalised correlation of the templates `kinds` (None: all) with the window, weighed
        by size (`size_bias`); -2 where a placement is not allowed. The field is normalised locally, so the
        map's energy under a template is taken as its area times the window's mean energy (one FFT per
        template instead of two)."""
        f = level.px / self.cfg.photo_px
        z = torch.from_numpy(edge_field(grey, self.cfg.smooth_px * f, self.cfg.norm_px * f, valid))
        kinds = list(range(len(self.kinds))) if kinds is None else kinds
        sel = torch.tensor(kinds)
        num = torch.fft.ifft2(torch.fft.fft2(z)[None] * level.t_hat(kinds)).real
        power = (z.real ** 2 + z.imag ** 2)[torch.from_numpy(valid)]
        mean = float(power.mean()) if power.numel() else 0.0
        den = level.t_norm[sel] * torch.sqrt((level.area[sel] * mean).clamp_min(1e-6)) + 1e-6
        return (num * (self._weight[sel] / den)[:, None, None]).masked_fill_(~level.allowed[sel], -2.0)

    def place(self, cx: float, cy: float) -> Placement | None:
        """The best placement of the photo within `search` footprints of (cx, cy); None off the raster."""
        read = self._read(cx, cy)
        if read is None:
            return None
        grey, valid, x0, y0 = read
        half = self.coarse.side
        small = cv2.resize(grey, (half, half), interpolation=cv2.INTER_AREA)
        small_valid = cv2.resize(valid.astype(np.uint8), (half, half), interpolation=cv2.INTER_NEAREST) > 0
        coarse = self._scores(self.coarse, small, small_valid, None).flatten(1).amax(dim=1)
        best_kinds = [int(k) for k in torch.argsort(coarse, descending=True)[:self.cfg.refine] if coarse[k] > -2.0]
        if not best_kinds:
            return None
        fine = self._scores(self.fine, grey, valid, best_kinds)
        side = self.fine.side
        flat = int(fine.argmax())
        v = float(fine.view(-1)[flat])
        if v <= -2.0:
            return None
        i, r, c = flat // (side * side), (flat // side) % side, flat % side
        k = best_kinds[i]
        tx, ty = self.fine.centres[k]
        px, py = c + tx, r + ty                       # working pixels from the window's corner
        a = self.info.affine
        x = x0 + px * self.gsd / self.mx * math.copysign(1.0, a.a)
        y = y0 + py * self.gsd / self.my * math.copysign(1.0, a.e)
        hd, s = self.kinds[k]
        return Placement(score=v, x=x, y=y, heading_deg=hd, scale=s)


def footprint_ring(p: Placement, footprint_m: float, aspect: float, mx: float, my: float
                   ) -> list[tuple[float, float]]:
    """The placed photo's ground rectangle: closed, counter-clockwise, raster CRS (mx, my: metres per unit).

    aspect: the photo's width over its height; its short side covers footprint_m x p.scale metres."""
    short = footprint_m * p.scale
    w, h = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    t = math.radians(p.heading_deg)
    up, right = (math.sin(t), math.cos(t)), (math.cos(t), -math.sin(t))
    ring = []
    for sx, sy in ((-1, 1), (1, 1), (1, -1), (-1, -1)):   # image order: top-left, top-right, ... (clockwise)
        ex = sx * w / 2 * right[0] + sy * h / 2 * up[0]
        ny = sx * w / 2 * right[1] + sy * h / 2 * up[1]
        ring.append((p.x + ex / mx, p.y + ny / my))
    ring.reverse()
    return ring + [ring[0]]


def structure_rerank(info: RasterInfo, photo: np.ndarray, candidates: list[Candidate], footprint_m: float,
                     yaw_deg: float | None = None, cfg: StructureConfig = DEFAULT_STRUCTURE,
                     dataset: rasterio.io.DatasetReader | None = None, span: float | None = None,
                     tile_scores: tuple[float, float] | None = None, upward: float = 1.0
                     ) -> tuple[list[Candidate], float]:
    """The first cfg.top_k candidates re-scored by edge structure and re-ranked; (candidates, seconds).

    The order is by structure score plus cfg.embedding_weight x the candidate's embedding score in standard
    deviations above the median tile (`tile_scores`: that median and standard deviation; None: structure
    alone). A placed candidate moves to where the photo fits (its tile stays in tile_x/tile_y/tile_polygon)
    and carries its `structure` score; the candidates beyond top_k, and those whose structure score is at or
    below cfg.min_score, follow the placed ones in their embedding order. Two candidates placed within
    half a footprint of each other are one place: the lower keeps its tile and embedding order.
    """
    t0 = time.perf_counter()
    head, tail = candidates[:cfg.top_k], candidates[cfg.top_k:]
    placed: list[tuple[float, Candidate]] = []
    rest: list[Candidate] = []
    with StructureMatcher(info, photo, footprint_m, yaw_deg, cfg, dataset, span, upward) as m:
        results = [(c, m.place(c.x, c.y)) for c in head]
    median, std = tile_scores if tile_scores and tile_scores[1] > 0 else (0.0, 0.0)

    def key(cp: tuple[Candidate, Placement | None]) -> float:
        c, p = cp
        if p is None:
            return -math.inf
        return p.score + (cfg.embedding_weight * (c.score - median) / std if std > 0 else 0.0)

    results.sort(key=key, reverse=True)
    taken: list[tuple[float, float]] = []
    for c, p in results:
        if p is None or p.score <= cfg.min_score or any(
                math.hypot((p.x - x) * m.mx, (p.y - y) * m.my) < 0.5 * footprint_m for x, y in taken):
            rest.append(replace(c, structure=None if p is None else round(p.score, 4)))
            continue
        taken.append((p.x, p.y))
        lon, lat = to_wgs84(info.crs_wkt).transform(p.x, p.y)
        ring = footprint_ring(p, footprint_m, photo.shape[1] / photo.shape[0], m.mx, m.my)
        placed.append((key((c, p)), replace(c, x=p.x, y=p.y, lon=float(lon), lat=float(lat), polygon=ring, tile_x=c.x,
                                        tile_y=c.y, tile_polygon=c.polygon, structure=round(p.score, 4))))
    rest.sort(key=lambda c: c.rank)
    out = [c for _, c in placed] + rest + list(tail)
    return [replace(c, rank=i + 1) for i, c in enumerate(out)], time.perf_counter() - t0
