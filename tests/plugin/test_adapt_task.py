"""Adapt model from the dock: a cancelled run changes nothing, a better model becomes active, rollback works."""

from __future__ import annotations

from pathlib import Path

import pytest

from .qgis_helpers import DATA, naip_adapt_case, wait_until

pytest.importorskip("torch")


@pytest.fixture()
def case(tmp_path: Path) -> dict:
    """A 1.6 km crop of NAIP 2015 and six photos simulated from NAIP 2020, labelled at their footprints."""
    from qgis.core import QgsProject, QgsRasterLayer

    raster, labels = naip_adapt_case(tmp_path)
    layer = QgsRasterLayer(str(raster), "naip 2015")
    QgsProject.instance().addMapLayer(layer)
    return {"layer": layer, "labels": labels}


def _controller(iface, case: dict):
    from cdikt_qgis.adapt_task import AdaptController
    from cdikt_qgis.model_panel import ModelPanel
    from cdikt_qgis.settings import CdiktSettings

    panel = ModelPanel(iface.mainWindow())
    settings = CdiktSettings()
    asked = case.setdefault("asked", [])  # the analyst says yes to adapting with the case's 6 pairs

    def confirm(n: int) -> bool:
        asked.append(n)
        return True

    return AdaptController(iface, panel, settings, raster=lambda: case["layer"], labels_path=lambda: case["labels"],
                           confirm_few_pairs=confirm), panel, settings


def test_a_cancelled_adaptation_leaves_the_active_model_unchanged(iface, case: dict, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    import shutil

    from model_backend.learn.versions import ModelRegistry
    from model_backend.nn.weights import default_weights_path

    controller, panel, settings = _controller(iface, case)
    active = tmp_path / "my_model" / default_weights_path().name  # the analyst's current model, a real one
    active.parent.mkdir()
    shutil.copyfile(default_weights_path(), active)
    original = active.read_bytes()
    settings.weights_path = str(active)
    task = controller.adapt()
    assert task is not None and panel.adapt_button.text() == "Cancel adaptation"
    progress: list[float] = []
    task.progressed.connect(lambda f, m: progress.append(f))
    assert wait_until(lambda: bool(progress) or controller.task is None, 120)  # the engine is at work
    panel.adapt_button.click()  # the same button cancels while running
    assert wait_until(lambda: controller.task is None, 120)
    assert task.outcome.status.value == "cancelled", task.message
    from qgis.core import QgsTask

    assert task.status() == QgsTask.Complete  # not "Task failed" in QGIS's message bar
    assert "unchanged" in panel.status.text() and panel.adapt_button.text() == "Adapt model"
    assert settings.weights_path == str(active) and active.read_bytes() == original
    assert ModelRegistry(data_dir).versions() == []
    assert list(data_dir.rglob("*.safetensors")) == []


def _fake_adapt(before_top1: float, after_top1: float):
    """Stands in for model_backend.learn.adapt.adapt: writes a file and registers it, like the real one."""
    from types import SimpleNamespace

    from model_backend.learn.adapt import ValidationFigure

    def fake(raster, labels, out, weights=None, *, config=None, cache_dir=None, registry=None, progress=None,
             cancel=None, **_):
        Path(out).write_bytes(b"adapted")
        n = 4
        before = ValidationFigure([1] * round(before_top1 * n) + [9] * (n - round(before_top1 * n)), 50)
        after = ValidationFigure([1] * round(after_top1 * n) + [9] * (n - round(after_top1 * n)), 50)
        registry.add(out, weights, {"after": after.to_dict()})
        return SimpleNamespace(out=out, before=before, after=after, trained_part="the last block",
                               use=after.top1 > before.top1)

    return fake


def test_a_better_model_becomes_active_and_roll_back_restores_the_previous(iface, case: dict, data_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import model_backend.learn.adapt
    from cdikt_qgis.settings import DEFAULT_MODEL_LABEL

    controller, panel, settings = _controller(iface, case)
    monkeypatch.setattr(model_backend.learn.adapt, "adapt", _fake_adapt(0.25, 0.75))
    first = controller.adapt()
    assert wait_until(lambda: controller.task is None, 60)
    assert first.outcome.succeeded and settings.weights_path == first.request.out
    assert "now active" in panel.status.text() and "25 % → 75 %" in panel.status.text()
    second = controller.adapt()  # adapting the adapted model: a chain of versions
    assert wait_until(lambda: controller.task is None, 60)
    assert settings.weights_path == second.request.out
    assert [panel.model_combo.itemData(i) for i in range(panel.model_combo.count())] == \
        [None, second.request.out, first.request.out]
    assert panel.model_combo.currentData() == second.request.out

    assert controller.rollback() == first.request.out
    assert settings.weights_path == first.request.out and panel.model_combo.currentData() == first.request.out
    assert panel.rollback_button.isEnabled()
    assert controller.rollback() is None  # back to the embedded default
    assert settings.weights_path is None and panel.model_combo.currentText() == DEFAULT_MODEL_LABEL
    assert not panel.rollback_button.isEnabled()  # the embedded default has nothing to roll back to
    assert controller.rollback() is None  # nothing left to roll back: says so, changes nothing
    assert any("nothing to roll back" in text for _, text, _ in iface.messages())

    panel.model_combo.setCurrentIndex(2)
    panel.model_combo.activated.emit(2)  # the picker chooses any version
    assert settings.weights_path == first.request.out
    Path(second.request.out).write_bytes(b"saved over by something else")
    panel.model_combo.setCurrentIndex(1)
    panel.model_combo.activated.emit(1)  # a recorded version whose file changed is refused, in one line
    assert settings.weights_path == first.request.out and panel.model_combo.currentData() == first.request.out
    assert any("has changed since it was recorded" in text for _, text, _ in iface.messages())

    monkeypatch.setattr(model_backend.learn.adapt, "adapt", _fake_adapt(0.75, 0.25))
    worse = controller.adapt()
    assert wait_until(lambda: controller.task is None, 60)
    assert worse.outcome.succeeded and settings.weights_path == first.request.out  # not better: not activated
    assert "stays active" in panel.status.text()


def test_adapt_without_labels_or_raster_says_what_to_do(iface, data_dir: Path, tmp_path: Path) -> None:
    from cdikt_qgis.adapt_task import AdaptController
    from cdikt_qgis.model_panel import ModelPanel

    panel = ModelPanel(iface.mainWindow())
    controller = AdaptController(iface, panel, raster=lambda: None, labels_path=lambda: tmp_path / "none.gpkg")
    assert controller.adapt() is None
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(DATA / "naip_northdakota_5m_2015.tif"), "naip")
    controller.raster = lambda: layer
    assert controller.adapt() is None
    texts = [text for _, text, _ in iface.messages()]
    assert any("Pick a raster layer" in t for t in texts) and any("No labelled pairs yet" in t for t in texts)


def test_few_pairs_are_counted_and_the_analyst_decides(iface, case: dict, data_dir: Path) -> None:
    """Six pairs are fewer than the ten recommended: the analyst is asked first, and no is respected."""
    from cdikt_qgis.adapt_task import AdaptController
    from cdikt_qgis.model_panel import ModelPanel

    panel = ModelPanel(iface.mainWindow())
    asked: list[int] = []
    controller = AdaptController(iface, panel, raster=lambda: case["layer"], labels_path=lambda: case["labels"],
                                 confirm_few_pairs=lambda n: asked.append(n) or False)
    assert not panel.rollback_button.isEnabled()  # the embedded default is active
    assert controller.adapt() is None and controller.task is None
    assert asked == [6]
    assert "6 labelled pairs" in panel.status.text() and "10 or more" in panel.status.text()
