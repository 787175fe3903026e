"""`make demo`: locate the bundled drone view on the bundled orthophoto and draw the result.

Runs the same engine call as the plugin and the CLI, then renders raster + heatmap + ranked
footprints + the true footprint with QGIS itself, so what a person sees in out/demo/demo.png
is what the plugin would show. A second run reuses the cached index (seconds, not minutes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from model_backend.core.config import QueryConfig  # noqa: E402
from model_backend.geo.geodesy import ground_distance_m  # noqa: E402
from model_backend.locate.pipeline import locate_photo  # noqa: E402

SAMPLE = ROOT / "resources" / "sample"
RASTER = SAMPLE / "manila_oam_0.10m.tif"
PHOTO = SAMPLE / "drone_view.jpg"
FOOTPRINT_M = 40.0  # the ground size of the photo's short side, as an analyst would enter it


def main() -> int:
    out = Path(os.environ.get("DEMO_OUT", ROOT / "out" / "demo"))
    truth = json.loads((SAMPLE / "drone_view.truth.json").read_text())

    def progress(f: float, msg: str) -> None:
        print(f"  [{f:5.0%}] {msg}", flush=True)

    print(f"Locating {PHOTO.name} on {RASTER.name} (footprint {FOOTPRINT_M:g} m)...")
    res = locate_photo(str(RASTER), str(PHOTO), str(out), query=QueryConfig(footprint_m=FOOTPRINT_M, top_k=5),
                       progress=progress)
    best = res.best
    cx, cy = truth["centre_lonlat"]
    err = float(ground_distance_m("EPSG:4326", [best.lon], [best.lat], [cx], [cy])[0])

    truth_gj = json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "truth"},
        "geometry": {"type": "Polygon", "coordinates": [truth["truth_polygon_lonlat"]
                                                        + truth["truth_polygon_lonlat"][:1]]}}]})
    from cdikt_qgis.headless import start_qgis
    from cdikt_qgis.render import render_png

    start_qgis()
    png = render_png(str(RASTER), res.heatmap_path, res.gpkg_path, str(out / "demo.png"), truth_geojson=truth_gj)

    print(json.dumps(res.json_line()))
    print(f"Best match: lon {best.lon:.6f}, lat {best.lat:.6f}, score {best.score:.3f}; "
          f"{err:.1f} m from the true centre ({'within' if err <= FOOTPRINT_M else 'NOT within'} one footprint).")
    print(f"Heatmap:  {res.heatmap_path}\nMatches:  {res.geojson_path}\n          {res.gpkg_path}\nPicture:  {png}")
    print(f"Footprint {res.footprint_note()}.")
    print(f"Took {res.seconds:.1f} s (indexes cached in {Path(res.index_dir).parent}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
