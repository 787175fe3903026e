"""What a drone photo says about itself: position, height, heading and camera, from EXIF/XMP.

These are priors, not truth: a photo may have none, some, or wrong ones, and the locator must
still work. So reading never raises — anything missing, partial or malformed becomes None — and
only `load_photo`, which the pipeline cannot do without, reports a bad file (as InputError).

Height for the ground footprint is DJI's XMP RelativeAltitude (height above the take-off point,
close to height above ground on flat terrain). EXIF GPSAltitude is above sea level (or the
ellipsoid) and says nothing about the ground, so it is kept but never turned into a footprint.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_backend.core.errors import InputError

log = logging.getLogger(__name__)

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_TAG_MAKE, _TAG_MODEL, _TAG_ORIENTATION = 0x010F, 0x0110, 0x0112
_TAG_FOCAL, _TAG_FOCAL35 = 0x920A, 0xA405
_TAG_FP_XRES, _TAG_FP_UNIT = 0xA20E, 0xA210
_FP_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
"""FocalPlaneResolutionUnit: inch, cm, mm, micrometre (in millimetres)."""

SENSOR_WIDTH_MM: dict[str, float] = {
    # DJI model codes (EXIF Model) -> sensor width along the long side, from the makers' specs.
    # 1/2.3" sensors are 6.17 x 4.55 mm; 1" sensors 13.2 x 8.8 mm.
    "FC200": 6.17,    # Phantom 2 Vision(+)
    "FC300C": 6.17,   # Phantom 3 Standard
    "FC300S": 6.17,   # Phantom 3 Professional
    "FC300X": 6.17,   # Phantom 3 Advanced / Professional
    "FC330": 6.17,    # Phantom 4
    "FC350": 6.17,    # Inspire 1 (Zenmuse X3)
    "FC220": 6.17,    # Mavic Pro
    "FC2103": 6.17,   # Mavic Air
    "FC7303": 6.17,   # Mini 2
    "FC3170": 6.4,    # Mavic Air 2 (1/2")
    "FC6310": 13.2,   # Phantom 4 Pro / Advanced / RTK (FC6310S, FC6310R)
    "FC6510": 13.2,   # Zenmuse X4S
    "FC6520": 17.3,   # Zenmuse X5S (micro four thirds)
    "FC3411": 13.2,   # Air 2S
    "L1D-20C": 13.2,  # Mavic 2 Pro (Hasselblad)
}
"""A model token matches a code exactly or with one trailing letter (FC6310S, FC6310R), so FC2204
(a different camera) does not borrow FC220's sensor."""
SENSOR_WIDTH_BY_NAME: dict[str, float] = {
    # Marketing names some tools write instead of the code; longest match wins.
    "PHANTOM 4 PRO": 13.2, "PHANTOM 4 ADVANCED": 13.2, "PHANTOM 4 RTK": 13.2, "PHANTOM 4": 6.17,
    "PHANTOM 3": 6.17, "PHANTOM VISION": 6.17, "MAVIC 2 PRO": 13.2, "MAVIC PRO": 6.17, "INSPIRE 1": 6.17,
}

_XMP_NUM = r"\s*=\s*\"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*\""


MAX_ALTITUDE_M = 10_000.0
"""Heights above take-off beyond this are broken tags, not drone flights (ignored as a footprint prior)."""


@dataclass(frozen=True)
class PhotoPriors:
    lat: float | None = None
    lon: float | None = None
    altitude_m: float | None = None
    """Absolute GPS altitude (sea level / ellipsoid): not a height above ground."""
    relative_altitude_m: float | None = None
    """Height above the take-off point (DJI XMP RelativeAltitude, or a flight log's height)."""
    focal_length_mm: float | None = None
    focal_length_35mm: float | None = None
    sensor_width_mm: float | None = None
    """Sensor extent along the stored image's width (its long side for DJI cameras)."""
    image_width: int | None = None
    """Pixels, after the EXIF orientation is applied."""
    image_height: int | None = None
    yaw_deg: float | None = None
    """Camera heading, clockwise from north, 0..360 (gimbal yaw, else the aircraft's)."""
    gimbal_pitch_deg: float | None = None
    """DJI convention: -90 looks straight down."""
    make: str | None = None
    model: str | None = None
    taken_s: float | None = None
    """When it was taken, seconds since 1970 reading the camera's clock as UTC (only differences between
    photos of one flight mean anything): EXIF DateTimeOriginal (+ sub-seconds), else DateTime, or a log's."""

    def ground_width_m(self, altitude_m: float | None = None) -> float | None:
        """Ground covered by the sensor's width (its long side) at nadir: altitude x sensor / focal.

        `altitude_m` overrides the photo's relative altitude (a user who knows the flight height).
        """
        alt = altitude_m if altitude_m is not None else self.relative_altitude_m
        if alt is None or not 0 < alt <= MAX_ALTITUDE_M or not self.sensor_width_mm or not self.focal_length_mm:
            return None  # an absurd altitude is a broken tag: ignored, as if the photo had none
        return alt * self.sensor_width_mm / self.focal_length_mm

    def ground_short_side_m(self, altitude_m: float | None = None) -> float | None:
        """Ground covered by the image's short side at nadir: the footprint the locator wants."""
        long_side = self.ground_width_m(altitude_m)
        if long_side is None or not self.image_width or not self.image_height:
            return None
        return long_side * min(self.image_width, self.image_height) / max(self.image_width, self.image_height)


METADATA_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, ArithmeticError, SyntaxError,
                   struct.error, UnidentifiedImageError)
"""What garbled metadata raises in Pillow and in the parsers here. Anything else is a bug, and raises."""


def read_priors(path: str) -> PhotoPriors:
    """Everything the photo's metadata gives; any field it lacks or garbles is None (and logged)."""
    try:
        with Image.open(path) as im:
            size = im.size
            try:
                exif = im.getexif()
            except METADATA_ERRORS as exc:  # malformed EXIF: carry on without it
                log.info("%s: unreadable EXIF (%s: %s); using no EXIF", Path(path).name, type(exc).__name__, exc)
                exif = None
    except METADATA_ERRORS as exc:  # not an image at all: nothing to read (load_photo says why)
        log.info("%s: no metadata read (%s: %s)", Path(path).name, type(exc).__name__, exc)
        return PhotoPriors()
    xmp = _read_xmp(path)
    fields: dict = {}
    for fn in (_gps, _camera, _xmp_fields, _time):
        try:
            fields.update(fn(exif, xmp, size))
        except METADATA_ERRORS as exc:  # one broken block must not lose the others
            log.info("%s: %s block skipped (%s: %s)", Path(path).name, fn.__name__.strip("_"),
                     type(exc).__name__, exc)
    for key, xkey, check in (("lat", "xmp_lat", _valid_lat), ("lon", "xmp_lon", _valid_lon),
                             ("altitude_m", "xmp_alt", _num)):
        value = fields.pop(xkey, None)
        if fields.get(key) is None:  # XMP position only fills what EXIF lacks
            fields[key] = check(value)
    return PhotoPriors(**fields)


def load_photo(path: str) -> np.ndarray:
    """Decode a photo to RGB uint8 upright (EXIF orientation applied); InputError if it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Photo not found: {p}. Check the path.")
    try:
        with warnings.catch_warnings():
            # Huge photos are shrunk right after decoding (`_at_most`); Pillow's warning would only
            # clutter the command line. Its hard limit (twice the warning's) still refuses bombs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            if im.format == "JPEG":  # decode at a reduced scale (1/2 .. 1/8) when the photo is huge
                im.draft("RGB", (MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
            im.load()
            im = _at_most(im, MAX_PHOTO_SIDE)
            try:
                im = ImageOps.exif_transpose(im)
            except METADATA_ERRORS as exc:  # a broken orientation tag leaves the image as stored
                log.info("%s: orientation tag ignored (%s: %s)", p.name, type(exc).__name__, exc)
            rgb = _to_rgb(im)
    except UnidentifiedImageError:
        raise InputError(f"{p.name} is not an image file; pick a JPEG, PNG or TIFF photo.") from None
    except Image.DecompressionBombError:
        raise InputError(f"{p.name} has too many pixels to load safely; downscale it first.") from None
    except (OSError, SyntaxError, ValueError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{p.name} is damaged or truncated and cannot be decoded ({detail}).") from None
    check_content(rgb, p.name)
    return rgb


MAX_PHOTO_SIDE = 6000
"""Photos are used at most this large (long side): matching works at a few hundred pixels a footprint,
and a 13000 x 13000 PNG of 20 KB would otherwise take gigabytes at every later step."""


def _at_most(im: Image.Image, side: int) -> Image.Image:
    """`im` shrunk by a whole factor (box filter) until its long side is at most `side`; else unchanged."""
    factor = -(-max(im.size) // side)
    if factor <= 1:
        return im
    if im.mode not in ("RGB", "RGBA", "L", "LA"):  # reduce() needs 8-bit modes
        im = im.convert("RGB") if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F") else im.convert("F")
    return im.reduce(factor)


MIN_PHOTO_PX = 32
"""A photo's short side must have at least this many pixels to be matched against tiles."""
MIN_CONTRAST = 2.0
"""Standard deviation (grey levels) below which a photo shows nothing to match: blank, black, a lens cap."""


def check_content(image: np.ndarray, name: str) -> None:
    """Refuse a photo with nothing to match (too small, or one flat colour) in one line.

    Any image gets a best tile, so without this a 1x1 or blank photo was "located" with a score of 0.7.
    """
    h, w = image.shape[:2]
    if min(h, w) < MIN_PHOTO_PX:
        raise InputError(f"{name} is {w} x {h} pixels: too small to match (at least {MIN_PHOTO_PX} px a side).")
    step = max(1, min(h, w) // 256)  # a few hundred thousand samples decide, whatever the photo's size
    if float(image[::step, ::step].reshape(-1, image.shape[-1]).std(axis=0).max()) < MIN_CONTRAST:
        raise InputError(f"{name} is blank (one flat colour): there is nothing in it to match.")


def read_visloc_log(csv_path: str) -> dict[str, PhotoPriors]:
    """Read a UAV-VisLoc flight log (num, filename, date, lat, lon, height, Omega, Kappa, Phi1, Phi2).

    How the columns are read: lat/lon are WGS84 degrees of the photo centre; height is the flight
    height in metres, taken as relative altitude (the flights are ~466 m over flat, near-sea-level
    land, so above take-off, above ground and above sea level agree to a few metres). The dataset's
    authors describe Phi1 and Phi2 both as yaw, Phi1 the more reliable (as quoted in the dataset's
    issue tracker, IntelliSensing/UAV-VisLoc#3); in flight 03, Phi2 follows
    the flight track within ±1.5° while Phi1 differs from it by about 6° (crab angle), as the
    camera's heading would. So `yaw_deg` = Phi1 (clockwise from north, mod 360). Omega and Kappa
    are small attitude angles (±5°, near-nadir photos) and are not mapped to a gimbal pitch.
    Rows with unreadable numbers keep None in those fields.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise InputError(f"Flight log not found: {p}. Check the path.")
    out: dict[str, PhotoPriors] = {}
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                r = {str(k or "").strip().lower(): str(v or "").strip() for k, v in row.items()}
                name = r.get("filename")
                if not name:
                    continue
                yaw = _num(r.get("phi1"))
                out[name] = PhotoPriors(
                    lat=_valid_lat(_num(r.get("lat"))), lon=_valid_lon(_num(r.get("lon"))),
                    relative_altitude_m=_num(r.get("height")), yaw_deg=None if yaw is None else yaw % 360.0,
                    taken_s=parse_time(r.get("date")),
                )
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{p.name} is not a readable CSV flight log ({type(e).__name__}).") from None
    return out


# --- pieces ---------------------------------------------------------------------------------

def _num(v: object) -> float | None:
    """A finite float from an EXIF rational, number or numeric string; None for anything else."""
    try:
        if isinstance(v, (bytes, bytearray)):
            v = v.decode("ascii", "ignore")
        if isinstance(v, str):
            v = v.strip().strip("\x00")
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _text(v: object) -> str | None:
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "ignore")
    if not isinstance(v, str):
        return None
    s = v.replace("\x00", "").strip()
    return s or None


def _valid_lat(x: float | None) -> float | None:
    return x if x is not None and -90 <= x <= 90 else None


def _valid_lon(x: float | None) -> float | None:
    return x if x is not None and -180 <= x <= 180 else None


def _dms(v: object, ref: object, negative: str) -> float | None:
    """Degrees from an EXIF (deg, min, sec) triple (or a bare number) and its N/S or E/W reference."""
    if isinstance(v, (tuple, list)):
        parts = [_num(x) for x in v]
        if not parts or any(x is None for x in parts):
            return None
        deg = sum(x / 60.0 ** i for i, x in enumerate(parts[:3]))  # type: ignore[operator]
    else:
        deg = _num(v)
    if deg is None:
        return None
    return -abs(deg) if (_text(ref) or "").upper().startswith(negative) else deg


def _gps(exif: Image.Exif | None, xmp: str, size: tuple[int, int]) -> dict:
    if exif is None:
        return {}
    gps = exif.get_ifd(_GPS_IFD)
    lat, lon = _valid_lat(_dms(gps.get(2), gps.get(1), "S")), _valid_lon(_dms(gps.get(4), gps.get(3), "W"))
    if lat == 0 and lon == 0:  # no fix: cameras write zeros
        lat = lon = None
    alt = _num(gps.get(6))
    if alt is not None and _num(gps.get(5)) == 1:  # GPSAltitudeRef 1 = below sea level
        alt = -alt
    return {"lat": lat, "lon": lon, "altitude_m": alt}


_TAG_DATETIME, _TAG_DATETIME_ORIGINAL, _TAG_SUBSEC_ORIGINAL = 306, 36867, 37521


def parse_time(text: object, subsec: object = None) -> float | None:
    """Seconds since 1970 from an EXIF 'YYYY:MM:DD HH:MM:SS' or an ISO 8601 time (naive: read as UTC)."""
    t = _text(text)
    if not t:
        return None
    t = t.replace("Z", "+00:00")
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            when = datetime.strptime(t[:19], fmt)
            break
        except ValueError:
            continue
    else:
        try:
            when = datetime.fromisoformat(t)
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp()
    frac = _text(subsec)
    if frac and frac.strip().isdigit():
        seconds += float("0." + frac.strip())
    return seconds


def _time(exif: Image.Exif | None, xmp: str, size: tuple[int, int]) -> dict:
    if exif is None:
        return {}
    sub = exif.get_ifd(_EXIF_IFD)
    taken = parse_time(sub.get(_TAG_DATETIME_ORIGINAL), sub.get(_TAG_SUBSEC_ORIGINAL))
    return {"taken_s": taken if taken is not None else parse_time(exif.get(_TAG_DATETIME))}


def _camera(exif: Image.Exif | None, xmp: str, size: tuple[int, int]) -> dict:
    width, height = size
    out: dict = {"image_width": width, "image_height": height}
    if exif is None:
        return out
    if _num(exif.get(_TAG_ORIENTATION)) in (5, 6, 7, 8):  # rotated by 90°: width and height swap
        out.update(image_width=height, image_height=width)
    sub = exif.get_ifd(_EXIF_IFD)
    make, model = _text(exif.get(_TAG_MAKE)), _text(exif.get(_TAG_MODEL))
    focal = _num(sub.get(_TAG_FOCAL))
    focal = focal if focal and focal > 0 else None
    f35 = _num(sub.get(_TAG_FOCAL35))
    f35 = f35 if f35 and f35 > 0 else None
    out.update(make=make, model=model, focal_length_mm=focal, focal_length_35mm=f35,
               sensor_width_mm=_sensor_width(model, sub, width, height, focal, f35))
    return out


def _sensor_width(model: str | None, sub: dict, width: int, height: int, focal: float | None,
                  f35: float | None) -> float | None:
    """Known camera first; else the focal-plane resolution; else the 35 mm-equivalent crop factor."""
    name = (model or "").upper()
    for token in re.split(r"[\s_/]+", name):
        code = re.sub(r"(?<=\d)[A-Z]$", "", token)
        if token in SENSOR_WIDTH_MM or code in SENSOR_WIDTH_MM:
            return SENSOR_WIDTH_MM.get(token, SENSOR_WIDTH_MM.get(code))
    for known in sorted(SENSOR_WIDTH_BY_NAME, key=len, reverse=True):
        if known in name:
            return SENSOR_WIDTH_BY_NAME[known]
    xres, unit = _num(sub.get(_TAG_FP_XRES)), _num(sub.get(_TAG_FP_UNIT))
    if xres and xres > 0 and unit in _FP_UNIT_MM and width:
        mm = width / xres * _FP_UNIT_MM[int(unit)]
        if 1.0 < mm < 100.0:  # a plausible sensor, not a placeholder resolution
            return mm
    if focal and f35 and width and height:  # 35 mm equivalence is defined on the diagonal (43.27 mm)
        diag = 43.27 * focal / f35
        return diag * width / math.hypot(width, height)
    return None


def _read_xmp(path: str, limit: int = 1 << 20) -> str:
    """The XMP packet, found by its markers in the file's first megabyte (where JPEG keeps it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return ""
    start = head.find(b"<x:xmpmeta")
    end = head.find(b"</x:xmpmeta>", start)
    if start < 0 or end < 0:
        return ""
    return head[start:end].decode("utf-8", "ignore")


def _xmp_value(xmp: str, name: str) -> float | None:
    """A numeric XMP property written as an attribute (DJI) or as an element."""
    m = re.search(name + _XMP_NUM, xmp) or re.search(
        r"<" + name + r">\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*</" + name + ">", xmp)
    return _num(m.group(1)) if m else None


def _xmp_fields(exif: Image.Exif | None, xmp: str, size: tuple[int, int]) -> dict:
    if not xmp:
        return {}
    out: dict = {}
    rel = _xmp_value(xmp, "drone-dji:RelativeAltitude")
    if rel is not None:
        out["relative_altitude_m"] = rel
    yaw = _xmp_value(xmp, "drone-dji:GimbalYawDegree")
    if yaw is None:
        yaw = _xmp_value(xmp, "drone-dji:FlightYawDegree")
    if yaw is not None:
        out["yaw_deg"] = yaw % 360.0
    pitch = _xmp_value(xmp, "drone-dji:GimbalPitchDegree")
    if pitch is not None:
        out["gimbal_pitch_deg"] = pitch
    for key, tag in (("xmp_lat", "drone-dji:GpsLatitude"), ("xmp_lon", "drone-dji:GpsLongitude"),
                     ("xmp_lon", "drone-dji:GpsLongtitude"), ("xmp_alt", "drone-dji:AbsoluteAltitude")):
        v = _xmp_value(xmp, tag)
        if v is not None:
            out.setdefault(key, v)
    return out


def _to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 from any PIL mode; 16-bit and float greys are scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        hi = float(np.nanmax(a)) if a.size else 0.0
        a = np.clip(np.nan_to_num(a) * (255.0 / hi if hi > 0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
