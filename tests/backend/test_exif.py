"""Photo priors from EXIF/XMP and flight logs: real DJI photo, stripped and damaged files."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_backend.core.errors import InputError
from model_backend.geo.exif import PhotoPriors, _sensor_width, load_photo, read_priors, read_visloc_log

DJI = "DJI_0061.JPG"          # Inspire 1 (FC350), Toledo OH, 2015, EXIF GPS, no XMP
VISLOC = "uavvisloc"          # UAV-VisLoc flight 03 log and one photo (EXIF stripped by the dataset)

DJI_XMP = b"""<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="DJI Meta Data" xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/"
 drone-dji:AbsoluteAltitude="+301.53" drone-dji:RelativeAltitude="+98.60"
 drone-dji:GimbalRollDegree="+0.00" drone-dji:GimbalYawDegree="-45.30" drone-dji:GimbalPitchDegree="-90.00"
 drone-dji:FlightRollDegree="+1.20" drone-dji:FlightYawDegree="-47.10" drone-dji:FlightPitchDegree="-2.30"/>
</rdf:RDF></x:xmpmeta>"""


def _insert_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Put one APPn segment right after SOI, the way cameras write EXIF and XMP."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + jpeg[2:]


def test_real_dji_photo(data_dir: Path) -> None:
    p = read_priors(str(data_dir / DJI))
    assert p.lat == pytest.approx(41.548596, abs=1e-5)      # 41°32'54.95" N
    assert p.lon == pytest.approx(-83.698649, abs=1e-5)     # 83°41'55.14" W
    assert p.altitude_m == pytest.approx(119.7)
    assert (p.make, p.model) == ("DJI", "FC350")
    assert p.focal_length_mm == pytest.approx(3.61) and p.focal_length_35mm == pytest.approx(20.0)
    assert p.sensor_width_mm == pytest.approx(6.17)
    assert (p.image_width, p.image_height) == (2400, 1800)   # not the EXIF's swapped 1800 x 2400
    assert p.relative_altitude_m is None and p.yaw_deg is None and p.gimbal_pitch_deg is None
    # No height above ground in this photo: no footprint unless the user gives one.
    assert p.ground_width_m() is None
    assert p.ground_width_m(100.0) == pytest.approx(100 * 6.17 / 3.61)
    assert p.ground_short_side_m(100.0) == pytest.approx(100 * 6.17 / 3.61 * 0.75)
    img = load_photo(str(data_dir / DJI))
    assert img.shape == (1800, 2400, 3) and img.dtype == np.uint8


def test_dji_xmp_gives_height_and_heading(tmp_path: Path, data_dir: Path) -> None:
    jpeg = (data_dir / DJI).read_bytes()
    path = tmp_path / "with_xmp.jpg"
    path.write_bytes(_insert_segment(jpeg, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + DJI_XMP))
    p = read_priors(str(path))
    assert p.relative_altitude_m == pytest.approx(98.6)
    assert p.yaw_deg == pytest.approx(314.7)                 # gimbal yaw, not the aircraft's
    assert p.gimbal_pitch_deg == pytest.approx(-90.0)
    assert p.altitude_m == pytest.approx(119.7)              # EXIF wins over XMP's absolute altitude
    assert p.lat == pytest.approx(41.548596, abs=1e-5)
    assert p.ground_short_side_m() == pytest.approx(98.6 * 6.17 / 3.61 * 0.75)
    assert load_photo(str(path)).shape == (1800, 2400, 3)


def test_photo_without_exif(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(path)
    p = read_priors(str(path))
    assert p == PhotoPriors(image_width=40, image_height=30)   # only what the pixels themselves say
    assert p.ground_short_side_m(100.0) is None
    real = read_priors(str(data_dir / VISLOC / "03_0565.JPG"))   # a real photo, EXIF stripped
    assert real == PhotoPriors(image_width=3976, image_height=2652)


def test_orientation_tag_swaps_size_and_rotates_pixels(tmp_path: Path, data_dir: Path) -> None:
    with Image.open(data_dir / DJI) as im:
        exif = im.getexif()
        small = im.resize((240, 180))
    exif[0x0112] = 6   # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    small.save(path, exif=exif.tobytes())
    p = read_priors(str(path))
    assert (p.image_width, p.image_height) == (180, 240)
    assert p.sensor_width_mm == pytest.approx(6.17) and p.model == "FC350"
    assert load_photo(str(path)).shape == (240, 180, 3)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_does_not_raise(tmp_path: Path, data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    garbage = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + rng.bytes(300)
    clean = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = tmp_path / "bad_exif.jpg"
    clean.save(path)
    path.write_bytes(_insert_segment(path.read_bytes(), 0xE1, garbage))
    p = read_priors(str(path))
    assert p.lat is None and p.lon is None and p.focal_length_mm is None
    assert load_photo(str(path)).shape == (48, 64, 3)   # the pixels are fine; only the metadata is not

    half = tmp_path / "truncated.jpg"
    half.write_bytes((data_dir / DJI).read_bytes()[:400_000])
    p = read_priors(str(half))                  # the EXIF header survives truncation
    assert p.lat == pytest.approx(41.548596, abs=1e-5)
    with pytest.raises(InputError, match="truncated"):
        load_photo(str(half))


def test_non_images_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    assert read_priors(str(text)) == PhotoPriors()
    assert read_priors(str(tmp_path / "missing.jpg")) == PhotoPriors()
    for bad in (text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(InputError) as e:
            load_photo(str(bad))
        assert "\n" not in str(e.value)


def test_sixteen_bit_grey_photo_loads(tmp_path: Path) -> None:
    path = tmp_path / "thermal.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(path)
    img = load_photo(str(path))
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8 and img.max() == 255


def test_visloc_flight_log(data_dir: Path, tmp_path: Path) -> None:
    log = read_visloc_log(str(data_dir / VISLOC / "03.csv"))
    assert len(log) == 768
    p = log["03_0565.JPG"]
    assert p.lat == pytest.approx(32.30196247) and p.lon == pytest.approx(119.8801657)
    assert p.relative_altitude_m == pytest.approx(466.24)
    assert p.yaw_deg == pytest.approx(122.887988)
    assert log["03_0001.JPG"].yaw_deg == pytest.approx(360 - 39.293446)   # negative Phi1 wrapped
    assert all(0 <= q.yaw_deg < 360 and 465 < q.relative_altitude_m < 468 for q in log.values())

    broken = tmp_path / "broken.csv"
    broken.write_text("num,filename,date,lat,lon,height,Omega,Kappa,Phi1,Phi2\n"
                      "1,a.JPG,2018-10-23T08:32:25,abc,119.9,,0,0,nan,0\n"
                      "2,,x,1,2,3,0,0,0,0\n")
    taken = read_visloc_log(str(broken))["a.JPG"].taken_s  # the flight's clock, read as UTC
    assert read_visloc_log(str(broken)) == {"a.JPG": PhotoPriors(lon=119.9, taken_s=taken)}
    assert taken == datetime(2018, 10, 23, 8, 32, 25, tzinfo=UTC).timestamp()
    times = [log[f"03_{i:04d}.JPG"].taken_s for i in range(1, 769)]
    assert all(b > a for a, b in zip(times, times[1:]))  # the log is a flight: its rows in time order
    with pytest.raises(InputError):
        read_visloc_log(str(tmp_path / "none.csv"))


SENSORS = [("FC350", 6.17), ("FC6310S", 13.2), ("FC6310R", 13.2), ("FC300X", 6.17), ("L1D-20c", 13.2),
           ("PHANTOM VISION FC200", 6.17), ("Phantom 4 Pro", 13.2), ("FC2204", None), ("Canon EOS R", None)]


@pytest.mark.parametrize("model, width_mm", SENSORS)
def test_sensor_table(model: str, width_mm: float | None) -> None:
    assert _sensor_width(model, {}, 4000, 3000, None, None) == width_mm


def test_sensor_width_fallbacks() -> None:
    # FocalPlaneXResolution 4000 px per 6.4 mm (unit 4 = mm), then the 35 mm-equivalent diagonal.
    assert _sensor_width("X", {0xA20E: 4000 / 6.4, 0xA210: 4}, 4000, 3000, None, None) == pytest.approx(6.4)
    assert _sensor_width("X", {}, 4000, 3000, 3.61, 20.0) == pytest.approx(43.27 * 3.61 / 20 * 0.8)
