"""The CDIKT Processing provider: cdikt:index and cdikt:locate through processing.run, and qgis_process.

Runs the real engine on the bundled Manila orthophoto (205 m at 0.1 m) with 40 m footprints (52 of
81 tiles kept, the rest is nodata collar), on photos rendered from the raster by the engine's own
view simulator. Tests that only need *an* index share one cache folder, so the raster is embedded
once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from .qgis_helpers import DATA, naip_adapt_case

RASTER = DATA / "manila_oam_0.10m.tif"
FOOTPRINT = 40.0
QGIS_PYTHON_PLUGINS = "/usr/share/qgis/python/plugins"


@pytest.fixture(scope="module")
def provider(qgis_app):
    """Processing initialised in the test QGIS, and the plugin's provider registered as QGIS would."""
    if QGIS_PYTHON_PLUGINS not in sys.path:
        sys.path.append(QGIS_PYTHON_PLUGINS)
    from processing.core.Processing import Processing
    from qgis.core import QgsApplication

    import cdikt_qgis

    Processing.initialize()
    QgsApplication.processingRegistry().removeProvider("cdikt")  # left by a test that failed before unload()
    plugin = cdikt_qgis.classFactory(None)
    plugin.initProcessing()
    assert plugin.provider is not None, getattr(plugin, "error", "") or (
        "a 'cdikt' provider leaked by an earlier test (a plugin dropped without unload()) blocks registration")
    yield plugin.provider
    plugin.unload()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two simulated drone photos (with their truth sidecars, which must be ignored)."""
    from model_backend.learn.datasets.synth import make_views, save_view

    folder = tmp_path_factory.mktemp("photos")
    for name, view in zip(("view_a.jpg", "view_b.jpg"), make_views(str(RASTER), 2, FOOTPRINT, seed=5)):
        save_view(view, str(folder / name))
    return folder


def _run(alg_id: str, params: dict, feedback=None) -> dict:
    import processing
    from qgis.core import QgsProcessingFeedback

    return processing.run(alg_id, params, feedback=feedback or QgsProcessingFeedback())


def _raster_crs():
    from qgis.core import QgsRasterLayer

    return QgsRasterLayer(str(RASTER), "manila").crs()


def test_provider_offers_index_and_locate_with_help_and_defaults(provider) -> None:
    from qgis.core import QgsApplication

    import cdikt_qgis

    registry = QgsApplication.processingRegistry()
    assert registry.providerById("cdikt") is provider and provider.name() == "CDIKT"
    assert sorted(a.id() for a in provider.algorithms()) == ["cdikt:adapt", "cdikt:index", "cdikt:locate",
                                                              "cdikt:locate_flight"]
    for alg in provider.algorithms():
        assert "<p>" in alg.shortHelpString() and alg.canExecute()[0]
        defaults = {p.name(): p.defaultValue() for p in alg.parameterDefinitions()}
        assert defaults["DEVICE"] == "auto"
        if alg.name() != "adapt":  # adapt takes its footprint from the labels
            assert defaults["FOOTPRINT"] == 60.0 and defaults["STRIDE"] == 0.5
    locate = registry.algorithmById("cdikt:locate")
    assert locate.parameterDefinition("TOP_K").defaultValue() == 5
    assert locate.parameterDefinition("FOOTPRINT_FROM_EXIF").defaultValue() is True  # as the dock's box

    second = cdikt_qgis.classFactory(None)  # a second instance must not replace or remove the first's provider
    second.initProcessing()
    assert second.provider is None
    second.unload()
    assert registry.providerById("cdikt") is provider


def test_dialog_defaults_follow_the_project_and_the_dock(provider, tmp_path) -> None:
    """A new dialog preselects the raster to search (not our heatmap) and the labelled pairs (not the
    Candidates layer), and "Use EXIF footprint" starts as the dock's box does."""
    import shutil

    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer

    from cdikt_qgis.labelling.store import LABELS_PROPERTY
    from cdikt_qgis.settings import CdiktSettings

    heat_path = tmp_path / "view_a.heatmap.tif"
    shutil.copyfile(DATA / "colorado_hro_0.15m_nodata.tif", heat_path)
    heat = QgsRasterLayer(str(heat_path), "Similarity")
    ortho = QgsRasterLayer(str(RASTER), "manila")
    candidates = QgsVectorLayer("Polygon?crs=EPSG:4326", "Candidates", "memory")
    candidates.setCustomProperty("cdikt/geojson_path", str(tmp_path / "x.geojson"))
    labels = QgsVectorLayer("Polygon?crs=EPSG:4326", "CDIKT labelled pairs", "memory")
    labels.setCustomProperty(LABELS_PROPERTY, str(tmp_path / "labels.gpkg"))
    QgsProject.instance().addMapLayers([candidates, heat, ortho, labels])  # ours first, as after a Locate
    registry = QgsApplication.processingRegistry()
    for alg_id in ("cdikt:locate", "cdikt:index", "cdikt:adapt"):
        alg = registry.createAlgorithmById(alg_id)  # what a dialog does: a fresh instance, initialised now
        assert alg.parameterDefinition("RASTER").defaultValue() == ortho.id(), alg_id
    assert registry.createAlgorithmById("cdikt:adapt").parameterDefinition("LABELS").defaultValue() == labels.id()
    for exif in (True, False):
        CdiktSettings().footprint_from_exif = exif
        alg = registry.createAlgorithmById("cdikt:locate")
        assert alg.parameterDefinition("FOOTPRINT_FROM_EXIF").defaultValue() is exif
    QgsProject.instance().clear()
    assert registry.createAlgorithmById("cdikt:locate").parameterDefinition("RASTER").defaultValue() is None


def test_index_reports_its_folder_and_tile_count_and_is_reused(provider, cache: Path) -> None:
    from qgis.core import QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    seen: list[float] = []
    feedback.progressChanged.connect(seen.append)
    params = {"RASTER": str(RASTER), "FOOTPRINT": FOOTPRINT, "CACHE_DIR": str(cache)}
    first = _run("cdikt:index", params, feedback)
    assert first["TILES"] > 0
    assert (Path(first["INDEX_DIR"]) / "manifest.json").is_file()
    assert Path(first["INDEX_DIR"]).is_relative_to(cache)
    assert seen and max(seen) == pytest.approx(100.0)
    again = _run("cdikt:index", {**params, "STRIDE": 0.5})
    assert again == first


def test_index_builds_the_compressed_index_on_request_as_the_cli_does(provider, cache: Path) -> None:
    from qgis.core import QgsProcessingException

    params = {"RASTER": str(RASTER), "FOOTPRINT": 16.0, "CACHE_DIR": str(cache)}
    off = _run("cdikt:index", {**params, "ANN": "off"})
    assert off["ANN_FILE"] == "" and off["TILES"] >= 256
    on = _run("cdikt:index", {**params, "ANN": "on"})
    assert on["INDEX_DIR"] == off["INDEX_DIR"] and Path(on["ANN_FILE"]) == Path(on["INDEX_DIR"]) / "ann.faiss"
    assert _run("cdikt:index", {**params, "ANN": "on"})["ANN_FILE"] == on["ANN_FILE"]  # built once: reused
    assert _run("cdikt:index", {**params, "ANN": "auto"})["ANN_FILE"] == ""  # auto waits for 10^6 tiles
    with pytest.raises(QgsProcessingException, match="at least 256"):
        _run("cdikt:index", {**params, "FOOTPRINT": FOOTPRINT, "ANN": "on"})  # 100-odd tiles: too few


def test_locate_a_folder_writes_a_heatmap_per_photo_and_one_matches_layer(provider, cache, photos, tmp_path) -> None:
    from qgis.core import QgsRasterLayer, QgsVectorLayer, QgsWkbTypes

    out = tmp_path / "run"
    res = _run("cdikt:locate", {
        "RASTER": str(RASTER), "PHOTOS": [str(photos)], "FOOTPRINT": FOOTPRINT, "TOP_K": 3,
        "CACHE_DIR": str(cache), "HEATMAPS": str(out / "heatmaps"), "OUTPUT": str(out / "matches.gpkg"),
    })
    assert res["LOCATED"] == 2 and res["FAILED"] == 0
    assert sorted(Path(p).name for p in res["HEATMAP_LAYERS"]) == ["view_a.heatmap.tif", "view_b.heatmap.tif"]
    crs = _raster_crs()
    for path in res["HEATMAP_LAYERS"]:
        heat = QgsRasterLayer(path, "heat")
        assert heat.isValid() and heat.crs() == crs and Path(path).parent == out / "heatmaps"

    matches = QgsVectorLayer(res["OUTPUT"], "matches")
    assert matches.isValid() and matches.crs() == crs
    assert matches.featureCount() == 3 * 2
    by_photo: dict[str, list[int]] = {}
    for f in matches.getFeatures():
        by_photo.setdefault(f["photo"], []).append(f["rank"])
        assert f.geometry().type() == QgsWkbTypes.PolygonGeometry and not f.geometry().isEmpty()
    assert {Path(k).name: sorted(v) for k, v in by_photo.items()} == {"view_a.jpg": [1, 2, 3], "view_b.jpg": [1, 2, 3]}
    assert all(Path(k).is_absolute() for k in by_photo)  # the full path: two flights may share a name


def test_one_matches_schema_for_the_layer_the_geojson_and_the_geopackage(provider, cache, photos, tmp_path) -> None:
    """Every option of the dock exists here too (Verify, Near GPS), and the Matches layer carries the
    engine's one schema, with the same values as the photo's GeoJSON and GeoPackage."""
    from qgis.core import QgsVectorLayer

    from model_backend.locate.export import MATCH_FIELDS

    out = _run("cdikt:locate", {"RASTER": str(RASTER), "PHOTOS": [str(photos / "view_a.jpg")], "FOOTPRINT": FOOTPRINT,
                                "FOOTPRINT_FROM_EXIF": False, "FOOTPRINT_TOLERANCE": 20.0, "TOP_K": 2,
                                "VERIFY": True, "NEAR_GPS_M": 0.0, "CACHE_DIR": str(cache),
                                "HEATMAPS": str(tmp_path / "h"), "OUTPUT": str(tmp_path / "m.gpkg")})
    layer = QgsVectorLayer(out["OUTPUT"], "matches", "ogr")
    names = [f.name() for f in layer.fields() if f.name() != "fid"]
    assert names[:len(MATCH_FIELDS)] == list(MATCH_FIELDS) and names[len(MATCH_FIELDS):] == ["heatmap", "photo_path"]
    sink = {f["rank"]: {k: f[k] for k in MATCH_FIELDS} for f in layer.getFeatures()}
    geojson = json.loads((tmp_path / "h" / "view_a.matches.geojson").read_text())
    gj = {f["properties"]["rank"]: f["properties"] for f in geojson["features"]}
    gpkg_layer = QgsVectorLayer(str(tmp_path / "h" / "view_a.matches.gpkg"), "gpkg", "ogr")
    gp = {f["rank"]: {k: f[k] for k in MATCH_FIELDS} for f in gpkg_layer.getFeatures()}
    assert sorted(sink) == sorted(gj) == sorted(gp) == [1, 2]
    assert list(gj[1])[:len(MATCH_FIELDS)] == list(MATCH_FIELDS)
    assert [f.name() for f in gpkg_layer.fields() if f.name() != "fid"][:len(MATCH_FIELDS)] == list(MATCH_FIELDS)

    def same(a, b) -> bool:
        a = None if a is None or (hasattr(a, "isNull") and a.isNull()) else a
        b = None if b is None or (hasattr(b, "isNull") and b.isNull()) else b
        return a == pytest.approx(b) if isinstance(a, float) and isinstance(b, float) else a == b

    for rank in (1, 2):
        for key in MATCH_FIELDS:
            assert same(sink[rank][key], gj[rank][key]), (rank, key, sink[rank][key], gj[rank][key])
            assert same(gp[rank][key], gj[rank][key]), (rank, key, gp[rank][key], gj[rank][key])
    assert gj[1]["verified"] is True and gj[1]["footprint_source"] == "user" and gj[1]["inliers"] > 0
    # the tolerance reached the engine: the size used is one of those around the size given (±20 %)
    assert gj[1]["footprint_given_m"] == FOOTPRINT
    assert gj[1]["footprint_m"] in {round(FOOTPRINT / 1.2, 2), FOOTPRINT, round(FOOTPRINT * 1.2, 2)}


def test_run_and_load_adds_styled_heatmap_and_matches_layers(provider, cache, photos, tmp_path) -> None:
    import processing
    from qgis.core import QgsProject, QgsRasterLayer, QgsRuleBasedRenderer, QgsSingleBandPseudoColorRenderer

    res = processing.runAndLoadResults("cdikt:locate", {
        "RASTER": str(RASTER), "PHOTOS": str(photos / "view_b.jpg"), "FOOTPRINT": FOOTPRINT, "TOP_K": 2,
        "CACHE_DIR": str(cache), "OUTPUT": str(tmp_path / "matches.geojson"),
    })
    assert (tmp_path / "matches.geojson").is_file()
    assert Path(res["HEATMAPS"]) == tmp_path / "matches_heatmaps"  # no folder given: beside the matches
    layers = list(QgsProject.instance().mapLayers().values())
    heat = [lyr for lyr in layers if isinstance(lyr, QgsRasterLayer)]
    vec = [lyr for lyr in layers if not isinstance(lyr, QgsRasterLayer)]
    assert len(heat) == 1 and len(vec) == 1
    assert heat[0].name() == "view_b.jpg similarity" and heat[0].crs() == _raster_crs()
    assert isinstance(heat[0].renderer(), QgsSingleBandPseudoColorRenderer)
    assert isinstance(vec[0].renderer(), QgsRuleBasedRenderer) and vec[0].featureCount() == 2


@pytest.mark.parametrize("case", ["missing photo", "footprint too large", "index footprint too large"])
def test_invalid_parameters_give_the_engine_one_line_message(provider, photos, tmp_path, case: str) -> None:
    from qgis.core import QgsProcessingException

    params = {"RASTER": str(RASTER), "PHOTOS": [str(photos / "view_a.jpg")], "FOOTPRINT": FOOTPRINT,
              "HEATMAPS": str(tmp_path / "h"), "OUTPUT": str(tmp_path / "m.gpkg")}
    alg, expected = "cdikt:locate", "larger than the raster"
    if case == "missing photo":
        params["PHOTOS"] = [str(tmp_path / "nowhere.jpg")]
        expected = "Photo not found"
    else:
        params["FOOTPRINT"] = 4000.0
        params["FOOTPRINT_FROM_EXIF"] = False  # the typed size, as is (the auto search would shrink it to fit)
        if case.startswith("index"):
            alg = "cdikt:index"
    with pytest.raises(QgsProcessingException) as err:
        _run(alg, params)
    message = str(err.value)
    assert expected in message and "\n" not in message.strip() and "Traceback" not in message


@pytest.mark.parametrize("alg", ["cdikt:index", "cdikt:locate"])
def test_cancelled_before_start_builds_no_index(provider, photos, tmp_path, alg: str) -> None:
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    feedback.cancel()
    cache = tmp_path / "cache"
    params = {"RASTER": str(RASTER), "PHOTOS": [str(photos)], "FOOTPRINT": FOOTPRINT, "CACHE_DIR": str(cache),
              "HEATMAPS": str(tmp_path / "h"), "OUTPUT": str(tmp_path / "m.gpkg")}
    if alg == "cdikt:index":
        params = {k: params[k] for k in ("RASTER", "FOOTPRINT", "CACHE_DIR")}
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        _run(alg, params, feedback)
    assert list(cache.glob("**/manifest.json")) == []
    assert not (tmp_path / "h").exists() and not (tmp_path / "m.gpkg").exists()


def test_adapt_refuses_labels_that_are_not_a_labels_file_or_empty(provider, tmp_path) -> None:
    from qgis.core import QgsProcessingException, QgsProject, QgsVectorLayer

    from model_backend.geo.raster import open_raster
    from model_backend.learn.labels import LabelSet, write_labels

    empty = tmp_path / "labels.geojson"
    write_labels(empty, LabelSet([], open_raster(RASTER).crs_wkt, str(empty)))
    params = {"RASTER": str(RASTER), "LABELS": str(empty), "OUTPUT": str(tmp_path / "m.safetensors"),
              "CACHE_DIR": str(tmp_path / "cache")}
    with pytest.raises(QgsProcessingException, match="holds no labelled pairs"):
        _run("cdikt:adapt", params)
    memory = QgsVectorLayer("Polygon?crs=EPSG:4326&field=photo:string", "scratch", "memory")
    QgsProject.instance().addMapLayer(memory)
    with pytest.raises(QgsProcessingException, match="not a labels GeoPackage or GeoJSON"):
        _run("cdikt:adapt", {**params, "LABELS": memory.id()})
    assert not (tmp_path / "m.safetensors").exists()


def test_adapt_writes_a_new_registered_model_and_reports_before_and_after(provider, tmp_path, monkeypatch) -> None:
    """The whole algorithm on a real (small) case: labels layer in, new weights file out, figures in the log."""
    from dataclasses import replace
    from functools import partial

    from qgis.core import QgsProcessingFeedback, QgsProject, QgsVectorLayer

    import model_backend.learn.adapt
    from model_backend.learn.adapt import AdaptConfig
    from model_backend.learn.adapt.train import TrainConfig
    from model_backend.learn.versions import ModelRegistry

    monkeypatch.setenv("CDIKT_DATA_DIR", str(tmp_path / "data"))
    tiny = replace(TrainConfig(), views_per_pair=2, unlabelled_tiles=8, styled_views_per_tile=1, steps_per_epoch=3)
    monkeypatch.setattr(model_backend.learn.adapt, "AdaptConfig", partial(AdaptConfig, runtime="torch", rotations=2,
                                                                    train=tiny))  # the algorithm's, made tiny
    raster, labels = naip_adapt_case(tmp_path)
    layer = QgsVectorLayer(str(labels), "labels", "ogr")
    assert layer.isValid() and layer.featureCount() == 6
    QgsProject.instance().addMapLayer(layer)  # owned by the project (cleared after each test), passed by id:
    layer_id = layer.id()  # a layer Python still holds when QGIS shuts down crashes the interpreter's exit
    del layer

    class Log(QgsProcessingFeedback):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []
            self.progress: list[float] = []
            self.progressChanged.connect(self.progress.append)

        def pushInfo(self, info: str) -> None:  # noqa: N802 (QGIS API)
            self.lines.append(info)
            super().pushInfo(info)

    log = Log()
    out = tmp_path / "models" / "adapted"  # no suffix: the algorithm adds .safetensors
    res = _run("cdikt:adapt", {"RASTER": str(raster), "LABELS": layer_id, "EPOCHS": 1, "OUTPUT": str(out),
                               "LOOK": 2, "CACHE_DIR": str(tmp_path / "cache")}, log)
    written = Path(res["OUTPUT"])
    assert written == out.with_suffix(".safetensors") and written.is_file() and written.stat().st_size > 1e6
    figures = json.loads(res["VALIDATION"])
    assert figures["n_train"] + figures["n_holdout"] == 6 and figures["epochs"] == 1
    assert res["TOP1_BEFORE"] == pytest.approx(figures["before"]["top1"], abs=1e-4)
    assert res["TOP1_AFTER"] == pytest.approx(figures["after"]["top1"], abs=1e-4)
    assert res["MEDIAN_RANK_AFTER"] == figures["after"]["median_rank"]
    assert res["USE"] is figures["use"] and len(figures["decision"]["pairs"]) == figures["n_train"]
    assert any(line.startswith(("Use it", "Keep the current model")) for line in log.lines)
    assert any(line.startswith("Before: top-1") for line in log.lines)
    assert any("Trained: MobileNetV2" in line and "luminance only" in line for line in log.lines)
    assert figures["look"] == "luminance"  # the Colour parameter reached the engine
    assert log.progress and max(log.progress) == pytest.approx(100.0)
    [version] = ModelRegistry(tmp_path / "data").versions()  # the dock's model picker lists it
    assert version.path == str(written)
    with pytest.raises(Exception, match="already exists"):  # never overwrites a model
        _run("cdikt:adapt", {"RASTER": str(raster), "LABELS": layer_id, "EPOCHS": 1, "OUTPUT": str(written),
                             "CACHE_DIR": str(tmp_path / "cache")})


def _cancel_after_first_check():
    """Feedback whose user presses Cancel once the engine runs (the first check is the algorithm's own).

    QgsFeedback.isCanceled is not virtual, but the algorithms ask it from Python, so this override is
    what the engine's cancel callable sees.
    """
    from qgis.core import QgsProcessingFeedback

    class Feedback(QgsProcessingFeedback):
        checks = 0

        def isCanceled(self) -> bool:  # noqa: N802 (QGIS API)
            self.checks += 1
            return self.checks > 1

    return Feedback()


def test_cancel_while_indexing_stops_the_engine_and_keeps_no_finished_index(provider, tmp_path) -> None:
    from qgis.core import QgsProcessingException

    feedback = _cancel_after_first_check()
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        _run("cdikt:index", {"RASTER": str(RASTER), "FOOTPRINT": FOOTPRINT, "CACHE_DIR": str(tmp_path)}, feedback)
    assert feedback.checks >= 2  # the engine itself asked, through the feedback
    assert list(tmp_path.glob("**/manifest.json")) == []


def _qgis_process() -> str | None:
    """The qgis_process binary. Debian's /usr/bin/qgis_process wrapper passes QGIS_OPTS=--noversioncheck
    from /etc/default/qgis, which qgis_process 3.22 rejects ("Command --noversioncheck not known!"),
    so the binary it wraps is called directly when present."""
    return shutil.which("qgis_process.bin") or shutil.which("qgis_process")


def _plugins_folder(root: Path) -> Path:
    """A plugins folder holding the plugin exactly as `make install` lays it out."""
    from ..plugin_install import make_install

    return make_install(root / "plugins").parent


@pytest.mark.skipif(_qgis_process() is None, reason="qgis_process is not installed")
def test_qgis_process_runs_locate_headless(photos, cache, tmp_path) -> None:
    """What a user scripts: enable the plugin in a throwaway profile, then `qgis_process run cdikt:locate`."""
    exe = _qgis_process()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(QGIS_PLUGINPATH=str(_plugins_folder(tmp_path)), QT_QPA_PLATFORM="offscreen",
               HOME=str(tmp_path / "home"), QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "profile"),
               CDIKT_CACHE_DIR=str(cache), XDG_RUNTIME_DIR=str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir(mode=0o700)
    enable = subprocess.run([exe, "plugins", "enable", "cdikt_qgis"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    out = tmp_path / "out"
    cmd = [exe, "--json", "run", "cdikt:locate", "--", f"RASTER={RASTER}", f"PHOTOS={photos}",
           f"FOOTPRINT={FOOTPRINT:g}", "TOP_K=2", f"OUTPUT={out / 'matches.gpkg'}"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(run.stdout[run.stdout.index("{"):])["results"]
    assert results["LOCATED"] == 2 and Path(results["OUTPUT"]) == out / "matches.gpkg"
    assert sorted(p.name for p in (out / "matches_heatmaps").glob("*.heatmap.tif")) == [
        "view_a.heatmap.tif", "view_b.heatmap.tif"]
    assert (out / "matches.gpkg").is_file()
    # the user's own profile and home were never touched
    assert (tmp_path / "profile" / "profiles" / "default").is_dir()


def test_one_adaptation_reaches_the_engine_as_one_request_from_all_three_front_ends(
        provider, iface, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI, cdikt:adapt and the dock's Adapt button ask for the same adaptation with the same
    AdaptRequest; the engine's entry point records what arrives and stops there (training is
    tested in tests/backend/test_adapt.py)."""
    from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer

    import model_backend.learn.adapt as engine
    from cdikt_qgis.adapt_task import AdaptController
    from cdikt_qgis.model_panel import ModelPanel
    from cdikt_qgis.settings import CdiktSettings
    from model_backend.cli import EXIT_CANCELLED, main
    from model_backend.core.errors import Cancelled
    from model_backend.nn.weights import default_weights_path

    from .qgis_helpers import wait_until

    arrived = []

    def entry(request, *, progress=None, cancel=None):
        arrived.append(request)
        raise Cancelled("Stopped by the test once the request arrived.")

    monkeypatch.setattr(engine, "adapt_model", entry)
    raster, labels = naip_adapt_case(tmp_path)
    raster, labels, weights = raster.resolve(), labels.resolve(), default_weights_path().resolve()

    assert main(["adapt", "--raster", str(raster), "--labels", str(labels), "--weights", str(weights),
                 "--out", str(tmp_path / "cli.safetensors")]) == EXIT_CANCELLED
    with pytest.raises(QgsProcessingException, match="Stopped by the test"):
        _run("cdikt:adapt", {"RASTER": str(raster), "LABELS": str(labels), "WEIGHTS": str(weights),
                             "OUTPUT": str(tmp_path / "processing.safetensors")})
    layer = QgsRasterLayer(str(raster), "naip 2015")
    QgsProject.instance().addMapLayer(layer)
    settings = CdiktSettings()
    settings.weights_path = str(weights)
    controller = AdaptController(iface, ModelPanel(iface.mainWindow()), settings, raster=lambda: layer,
                                 labels_path=lambda: labels, confirm_few_pairs=lambda n: True)
    task = controller.adapt()
    assert task is not None and wait_until(lambda: controller.task is None, 60)
    assert task.outcome.status.value == "cancelled"
    QgsProject.instance().removeMapLayer(layer.id())

    def asked(r) -> tuple:  # what the analyst decided; the output file and folders are each front end's
        return (Path(r.raster), Path(r.labels), Path(r.model.weights), r.model.runtime, r.photos, r.flight_photos,
                r.epochs, r.look, r.seed, r.record)

    assert len(arrived) == 3
    assert asked(arrived[0]) == asked(arrived[1]) == asked(arrived[2])
    assert Path(arrived[0].out).name == "cli.safetensors" and Path(arrived[1].out).name == "processing.safetensors"
    assert Path(arrived[2].out).is_relative_to(data_dir) and arrived[2].out.endswith(".safetensors")


def test_locate_flight_writes_a_track_and_a_photo_table(provider, cache, tmp_path) -> None:
    """cdikt:locate_flight: a simulated survey over the Manila raster becomes a Track line and a Photos layer."""
    from qgis.core import QgsVectorLayer, QgsWkbTypes

    from model_backend.learn.datasets.flights import FlightPlan, simulate_flight

    truth = simulate_flight(RASTER, FlightPlan("lawnmower", 6, FOOTPRINT), 2, tmp_path / "flight")
    res = _run("cdikt:locate_flight", {
        "RASTER": str(RASTER), "PHOTOS": [str(tmp_path / "flight")], "FOOTPRINT": FOOTPRINT,
        "FOOTPRINT_FROM_EXIF": False, "VERIFY": False, "CACHE_DIR": str(cache), "OUTPUT_FOLDER": str(tmp_path / "out"),
    })
    assert res["LOCATED"] == 6 and res["FAILED"] == 0 and Path(res["CSV"]).is_file()
    track = QgsVectorLayer(res["TRACK"], "track")
    points = QgsVectorLayer(res["PHOTO_POINTS"], "photos")
    assert track.isValid() and points.isValid() and track.crs() == _raster_crs()
    line = next(track.getFeatures()).geometry()
    assert line.type() == QgsWkbTypes.LineGeometry and QgsWkbTypes.hasM(line.wkbType())
    rows = sorted(points.getFeatures(), key=lambda f: f["order"])
    assert [Path(f["photo"]).name for f in rows] == [Path(t.path).name for t in truth]
    hits = sum(((f["x"] - t.spec.cx) ** 2 + (f["y"] - t.spec.cy) ** 2) ** 0.5 <= FOOTPRINT for f, t in zip(rows, truth))
    assert hits >= 5, hits
