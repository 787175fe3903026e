"""The CDIKT Processing provider: registered by the plugin's initProcessing(), removed by unload().

qgis_process loads plugins with hasProcessingProvider=yes through classFactory(None) and
initProcessing() only, so nothing here may need iface or import torch.
"""

from __future__ import annotations

from qgis.core import QgsApplication, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .adapt_algorithm import AdaptModelAlgorithm
from .flight_algorithm import LocateFlightAlgorithm
from .index_algorithm import BuildIndexAlgorithm
from .locate_algorithm import LocatePhotosAlgorithm

PROVIDER_ID = "cdikt"


class CdiktProvider(QgsProcessingProvider):
    """Provider ``cdikt``: Build tile index (``cdikt:index``), Locate drone photos (``cdikt:locate``), Locate a
    flight (``cdikt:locate_flight``) and Adapt model to labelled pairs (``cdikt:adapt``)."""

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "CDIKT"

    def longName(self) -> str:  # noqa: N802 (QGIS API)
        return "CDIKT drone photo localisation"

    def icon(self) -> QIcon:
        from ..icons import icon_path

        path = icon_path()
        return QIcon(path) if path else QgsApplication.getThemeIcon("/processingAlgorithm.svg")

    def loadAlgorithms(self) -> None:  # noqa: N802
        for alg in (BuildIndexAlgorithm(), LocatePhotosAlgorithm(), LocateFlightAlgorithm(), AdaptModelAlgorithm()):
            self.addAlgorithm(alg)
