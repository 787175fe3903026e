"""A flight's photos decoded together: the path through their candidates that a drone could have flown.

Alone, a photo over a uniform field or another year's crops has several places that look alike;
beside its neighbours, taken seconds before and after, only one of them is reachable. Each photo's
top-K candidates are the states of a hidden Markov model over the photo sequence:

- emission: how well the photo matches the candidate, as `emission_weight` x the candidate's score in
  standard deviations above the photo's median tile (so photos of bland and busy ground compare),
  plus `verified_bonus` for a geometrically verified footprint, plus a Gaussian GPS prior where the
  photo has one;
- transition: the ground distance between consecutive choices against how far the drone can get
  in the time between them (`max_speed_m_s` x the gap, plus `slack` footprints for the error of each
  position), a hard-ish penalty beyond that reach and a mild one for distance within it; against
  the move measured by matching the two photos (`flight.motion`), a capped Gaussian penalty; when
  both footprints are verified, a mild penalty for the change of heading.

A photo none of whose candidates fits its neighbours is skipped: the path may jump from photo t to
photo t+2 (up to `max_skip` photos), paying `skip_penalty` per skipped photo and checking reach over
the longer gap. Such a photo is flagged `outlier` and keeps its own #1: flagged, not forced. The
best path is found by Viterbi (max-sum) on this DAG, and each node's posterior probability by the
forward-backward (sum-product) pass on the same graph: the chosen candidate's posterior is the
photo's confidence in the sequence. Everything is in log units; cost is O(T x max_skip x K^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model_backend.core.errors import InputError


@dataclass(frozen=True)
class DecodeConfig:
    """The flight model's knobs; the defaults were set on simulated flights of the sample rasters."""

    max_speed_m_s: float = 20.0
    """Fastest ground speed to allow between photos (multirotors survey at 5-15 m/s)."""
    default_interval_s: float = 3.0
    """Time assumed between consecutive photos when timestamps are missing."""
    slack: float = 0.75
    """Position error allowed per transition, in footprints (tile centre vs true centre, at both ends)."""
    reach_weight: float = 4.0
    """Log-penalty per slack beyond the reach: a move twice too far costs about this much per footprint."""
    distance_weight: float = 0.5
    """Log-penalty for a move as long as the whole reach: prefers the nearer of two reachable places."""
    heading_weight: float = 1.0
    """Log-penalty for a 180-degree change of heading between two verified footprints, when no turn
    was measured between the photos (only verified headings are trusted: a heading read from the
    best of 8 query rotations is right within 45 degrees about half the time across years)."""
    turn_weight: float = 2.0
    """Log-penalty for two verified headings disagreeing by 180 degrees with the turn measured between them."""
    direction_weight: float = 0.5
    """Log-penalty for a move 180 degrees off the direction measured between the photos, given the
    first photo's heading at that place (any heading, verified or read from the query rotation)."""
    emission_weight: float = 1.0
    """Log-evidence per standard deviation of tile score."""
    verified_bonus: float = 4.0
    """Log-evidence added for a verified footprint (its confidence times this)."""
    gps_sigma_m: float = 30.0
    """Standard deviation of a photo's GPS position as a prior (raster registration included)."""
    motion_weight: float = 1.0
    """Log-penalty per squared standard error between a move and the move measured photo to photo."""
    motion_rel: float = 0.25
    """Standard error of a measured move, as a fraction of it (the footprint itself may be 30 % off)."""
    motion_abs: float = 0.1
    """... plus this fraction of the footprint (tile centres are a half stride apart)."""
    motion_cap: float = 8.0
    """Most a contradicted measurement costs: a wrong match between photos must not outweigh the map."""
    motion_bonus: float = 1.0
    """Log-evidence a move that agrees with its measurement gains (the likelihood ratio against a move
    nothing measured): a measured skip over a photo then outweighs passing through it unmeasured."""
    unmatched_weight: float = 2.5
    """Log-penalty for two photos that did not match although the places chosen for them nearly coincide
    (closer than `unmatched_overlap` footprints: they would share most of their ground)."""
    unmatched_overlap: float = 1.0
    skip_penalty: float = 6.0
    """Log-cost of leaving one photo out of the path (an outlier)."""
    max_skip: int = 3
    """Most consecutive photos one jump may leave out."""

    def __post_init__(self) -> None:
        if self.max_speed_m_s <= 0 or self.default_interval_s <= 0 or self.slack <= 0:
            raise InputError("The flight's speed, photo interval and slack must be positive.")
        if self.max_skip < 0:
            raise InputError(f"max_skip must be 0 or more, got {self.max_skip}.")


@dataclass(frozen=True)
class Move:
    """A move measured between two photos (`flight.motion`), in metres on the ground."""

    step_m: float
    direction_deg: float
    """Clockwise from the earlier photo's top."""
    turn_deg: float
    """Later photo's heading minus the earlier one's."""


@dataclass
class Observation:
    """One photo as the decoder sees it: its candidates in a local metric frame, and its evidence."""

    xs: np.ndarray
    """(K,) candidate centres, metres east in one frame shared by the whole flight."""
    ys: np.ndarray
    """(K,) metres north."""
    z: np.ndarray
    """(K,) candidate scores in standard deviations above the photo's median tile score."""
    footprint_m: float
    time_s: float | None = None
    """Seconds since any fixed origin (EXIF time); None: unknown."""
    verified: np.ndarray | None = None
    """(K,) confidence of each verified footprint, 0 where unverified; None: not verified."""
    heading_deg: np.ndarray | None = None
    """(K,) the photo's heading at each place: verified, else the best query rotation's (NaN: unknown)."""
    gps_xy: tuple[float, float] | None = None
    """The photo's GPS position in the same frame, used as a prior."""
    moves: dict[int, Move] = field(default_factory=dict)
    """Moves measured by matching this photo with the one `gap` photos before it, by gap."""
    unmatched: frozenset[int] = frozenset()
    """Gaps at which that matching was tried and found no overlap."""
    stray: bool = False
    """The photo overlaps neither neighbour while they overlap each other: it was not taken between
    them (another flight's photo, a lens cap, a photo of the sky), so the track must leave it out."""

    def __post_init__(self) -> None:
        self.xs, self.ys, self.z = (np.asarray(a, np.float64).ravel() for a in (self.xs, self.ys, self.z))
        if not self.xs.size or not self.xs.shape == self.ys.shape == self.z.shape:
            raise InputError("An observation needs at least one candidate, with x, y and score each.")

    @property
    def k(self) -> int:
        return int(self.xs.size)


@dataclass
class Decoded:
    """The sequence's answer: per photo, the chosen candidate (-1: outlier) and its posterior."""

    choice: list[int]
    """Index into each photo's candidates; -1 where the path skipped the photo."""
    confidence: list[float]
    """Posterior probability that the photo lies within half a footprint of the choice (for an outlier:
    that it is skipped)."""
    posterior: list[np.ndarray] = field(default_factory=list)
    """(K,) posterior of every candidate of every photo (they sum to 1 - P(skipped))."""
    log_score: float = 0.0


def emissions(obs: Observation, cfg: DecodeConfig) -> np.ndarray:
    if obs.stray:
        return np.full(obs.k, -np.inf)
    e = cfg.emission_weight * (obs.z - obs.z.max())
    if obs.verified is not None:
        e = e + cfg.verified_bonus * np.nan_to_num(np.asarray(obs.verified, np.float64))
    if obs.gps_xy is not None:
        d2 = (obs.xs - obs.gps_xy[0]) ** 2 + (obs.ys - obs.gps_xy[1]) ** 2
        e = e - d2 / (2.0 * cfg.gps_sigma_m ** 2)
    return e


def transition(a: Observation, b: Observation, gap: int, cfg: DecodeConfig) -> np.ndarray:
    """(Ka, Kb) log-probability of moving from each candidate of `a` to each of `b`, `gap` photos later."""
    if a.time_s is not None and b.time_s is not None:
        dt = abs(b.time_s - a.time_s)
    else:
        dt = gap * cfg.default_interval_s
    slack = cfg.slack * 0.5 * (a.footprint_m + b.footprint_m)
    reach = cfg.max_speed_m_s * dt + slack
    d = np.hypot(a.xs[:, None] - b.xs[None, :], a.ys[:, None] - b.ys[None, :])
    t = -cfg.reach_weight * np.maximum(0.0, d - reach) / slack - cfg.distance_weight * d / reach
    foot = 0.5 * (a.footprint_m + b.footprint_m)
    move = b.moves.get(gap)
    if move is not None and cfg.motion_weight:
        sigma = cfg.motion_rel * move.step_m + cfg.motion_abs * foot
        t = t + cfg.motion_weight * (cfg.motion_bonus
                                     - np.minimum(cfg.motion_cap, 0.5 * ((d - move.step_m) / sigma) ** 2))
    elif gap in b.unmatched and cfg.unmatched_weight:
        t = t - cfg.unmatched_weight * np.clip(1.0 - d / (cfg.unmatched_overlap * foot), 0.0, 1.0)
    ha = None if a.heading_deg is None else np.asarray(a.heading_deg, np.float64)
    hb = None if b.heading_deg is None else np.asarray(b.heading_deg, np.float64)
    if ha is not None and hb is not None and a.verified is not None and b.verified is not None:
        turn = move.turn_deg if move is not None else 0.0
        weight = cfg.turn_weight if move is not None else cfg.heading_weight
        both = (np.asarray(a.verified)[:, None] > 0) & (np.asarray(b.verified)[None, :] > 0)
        dh = np.deg2rad(hb[None, :] - ha[:, None] - turn)
        t = t - weight * both * np.nan_to_num((1.0 - np.cos(dh)) / 2.0)
    if move is not None and ha is not None and cfg.direction_weight:
        bearing = np.arctan2(b.xs[None, :] - a.xs[:, None], b.ys[None, :] - a.ys[:, None])
        expected = np.deg2rad(ha + move.direction_deg)[:, None]
        # A short move's direction is noise (tile centres a half stride apart): weigh it by its length.
        w = np.clip(d / max(0.5 * move.step_m, 1e-6), 0.0, 1.0)
        t = t - cfg.direction_weight * w * np.nan_to_num((1.0 - np.cos(bearing - expected)) / 2.0)
    return t


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # a stray photo's states are all -inf: log(0) is the right answer
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def decode(observations: list[Observation], cfg: DecodeConfig = DecodeConfig()) -> Decoded:
    """Viterbi path and forward-backward posteriors over the photos' candidates (see the module doc)."""
    n = len(observations)
    if n == 0:
        return Decoded([], [])
    emit = [emissions(o, cfg) for o in observations]
    s = cfg.max_skip
    trans: dict[tuple[int, int], np.ndarray] = {}
    for t in range(1, n):
        for p in range(max(0, t - s - 1), t):
            trans[p, t] = transition(observations[p], observations[t], t - p, cfg)
    # Entering at photo t skips the t photos before it; leaving after photo t skips the rest.
    enter = [-cfg.skip_penalty * t if t <= s else -math.inf for t in range(n)]
    leave = [-cfg.skip_penalty * (n - 1 - t) if n - 1 - t <= s else -math.inf for t in range(n)]

    best: list[np.ndarray] = []
    back: list[tuple[np.ndarray, np.ndarray]] = []
    fwd: list[np.ndarray] = []
    for t in range(n):
        vals_max = [np.full(observations[t].k, enter[t])]
        vals_sum = [np.full(observations[t].k, enter[t])]
        froms = [(-1, np.full(observations[t].k, -1))]
        for p in range(max(0, t - s - 1), t):
            skip = -cfg.skip_penalty * (t - p - 1)
            m = best[p][:, None] + trans[p, t] + skip
            arg = np.argmax(m, axis=0)
            vals_max.append(m[arg, np.arange(m.shape[1])])
            froms.append((p, arg))
            vals_sum.append(_logsumexp(fwd[p][:, None] + trans[p, t] + skip, axis=0))
        stacked = np.stack(vals_max)
        which = np.argmax(stacked, axis=0)
        best.append(stacked[which, np.arange(stacked.shape[1])] + emit[t])
        back.append((np.array([froms[w][0] for w in which]),
                     np.array([froms[w][1][j] for j, w in enumerate(which)])))
        fwd.append(_logsumexp(np.stack(vals_sum), axis=0) + emit[t])

    bwd: list[np.ndarray] = [np.empty(0)] * n
    for t in range(n - 1, -1, -1):
        terms = [np.full(observations[t].k, leave[t])]
        for q in range(t + 1, min(n, t + s + 2)):
            skip = -cfg.skip_penalty * (q - t - 1)
            terms.append(_logsumexp(trans[t, q] + (emit[q] + bwd[q])[None, :] + skip, axis=1))
        bwd[t] = _logsumexp(np.stack(terms), axis=0)
    log_z = float(_logsumexp(np.concatenate([f + np.full_like(f, leave[t]) for t, f in enumerate(fwd)]), axis=0))
    posterior = [np.exp(np.clip(fwd[t] + bwd[t] - log_z, -700.0, 0.0)) for t in range(n)]

    ends = [(float(np.max(best[t]) + leave[t]), t) for t in range(n) if np.isfinite(leave[t])]
    score, t = max(ends)
    choice = [-1] * n
    k = int(np.argmax(best[t]))
    while t >= 0:
        choice[t] = k
        p, kp = int(back[t][0][k]), int(back[t][1][k])
        t, k = p, kp
    confidence = []
    for t, c in enumerate(choice):
        if c < 0:
            confidence.append(float(max(0.0, 1.0 - posterior[t].sum())))
            continue
        # Neighbouring tiles overlap and split the mass of one place: count every state within half a footprint.
        o = observations[t]
        near = np.hypot(o.xs - o.xs[c], o.ys - o.ys[c]) <= 0.5 * o.footprint_m
        confidence.append(float(min(1.0, posterior[t][near].sum())))
    return Decoded(choice, confidence, posterior, score)
