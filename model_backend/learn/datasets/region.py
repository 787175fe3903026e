"""A part of a raster, as fractions of its width and height: the unit of a spatial hold-out.

Training on the west of a raster and measuring on its east is the only honest way to measure a
model on an area it was trained on in other places (the three NAIP years cover one area): the
model has seen the years' change, but never the fields it is tested on. Fractions, not pixels or
metres, so one region means the same part of co-registered rasters of different sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_backend.core.errors import InputError


@dataclass(frozen=True)
class Region:
    """Fractions of the raster from its top-left corner: x0 <= x < x1 of the width, y0 <= y < y1 of the height."""

    x0: float = 0.0
    y0: float = 0.0
    x1: float = 1.0
    y1: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.x0 < self.x1 <= 1.0 and 0.0 <= self.y0 < self.y1 <= 1.0):
            raise InputError(f"Region {self.text()} must be four fractions x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 "
                             "and 0 <= y0 < y1 <= 1.")

    @classmethod
    def parse(cls, text: str) -> Region:
        """'x0,y0,x1,y1', e.g. '0,0,0.6,1' for the western 60 %."""
        try:
            x0, y0, x1, y1 = (float(v) for v in text.split(","))
        except ValueError:
            raise InputError(f"Region {text!r} is not four comma-separated fractions x0,y0,x1,y1 "
                             "(e.g. 0,0,0.6,1 for the western 60 %).") from None
        return cls(x0, y0, x1, y1)

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(col0, row0, col1, row1) of a raster of this size."""
        return self.x0 * width, self.y0 * height, self.x1 * width, self.y1 * height

    def holds(self, width: int, height: int, col0: float, row0: float, col1: float, row1: float) -> bool:
        """True when the pixel box lies wholly inside the region."""
        c0, r0, c1, r1 = self.pixels(width, height)
        return col0 >= c0 and row0 >= r0 and col1 <= c1 and row1 <= r1

    def text(self) -> str:
        return f"{self.x0:g},{self.y0:g},{self.x1:g},{self.y1:g}"


WHOLE = Region()
