"""Numbers, intervals, Markdown tables and PNG figures as the reports write them.

Shared by the evaluation report (:mod:`pipeline.report`) and the transfer-learning study
(:mod:`pipeline.study`). No torch, and matplotlib / PIL are imported only inside :func:`png`, so the
CLI can import the study without them.
"""

from __future__ import annotations

import html
import io
import math

#: how a missing or undefined number is written
DASH = "–"


def missing(value) -> bool:
    """True for None and float nan (numpy floats included)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value, digits: int = 3) -> str:
    """A number to ``digits`` decimals; None or nan as an en dash."""
    return DASH if missing(value) else f"{value:.{digits}f}"


def interval(ci) -> str:
    """``[lo, hi]`` to 3 decimals, or an en dash when ``ci`` is absent or either bound is undefined."""
    if not ci or any(num(v) == DASH for v in ci):
        return DASH
    return f"[{num(ci[0])}, {num(ci[1])}]"


def pct(fraction: float) -> str:
    """A fraction as a percentage with no needless digits: 0.1 -> ``10%``, 0.125 -> ``12.5%``."""
    return f"{fraction * 100:g}%"


def cell(value) -> str:
    """Any value as text safe in a Markdown table cell and in the HTML made from it."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines (header, separator, one line per row), followed by an empty line."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def png(figure, dpi: int = 110, quantise: bool = True) -> bytes:
    """A matplotlib ``figure`` as PNG bytes.

    ``quantise``: a 256-colour PNG, about a third of matplotlib's RGBA file for noisy medical images
    (a three-panel Grad-CAM figure of 224 x 224 images stays near 130 kB) with no visible loss;
    otherwise matplotlib's own file.
    """
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi)
    if not quantise:
        return out.getvalue()
    from PIL import Image

    quantised = io.BytesIO()
    Image.open(out).convert("RGB").quantize(256).save(quantised, format="png", optimize=True)
    return quantised.getvalue()
