"""Report formatting: numbers and intervals (missing ones as an en dash), percentages, Markdown cells and
tables, PNG figures, and no torch or matplotlib on import."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import formatting
from pipeline.formatting import cell, interval, missing, num, pct, table

DASH = "–"  # en dash


@pytest.mark.parametrize("value", [None, math.nan, float("nan"), np.float64("nan")])
def test_missing_numbers_are_an_en_dash(value):
    assert missing(value) and num(value) == DASH and num(value, 1) == DASH


def test_numbers_are_rounded_to_the_digits_asked_for():
    assert num(0.87654) == "0.877" and num(0.87654, 1) == "0.9" and num(np.float64(1)) == "1.000"
    assert num(2) == "2.000" and not missing(0.0) and not missing(0) and not missing("text")


@pytest.mark.parametrize("ci", [None, [], [math.nan, 0.5], [0.4, None], [None, None]])
def test_an_absent_or_half_undefined_interval_is_an_en_dash(ci):
    assert interval(ci) == DASH


def test_an_interval_is_both_bounds_to_three_decimals():
    assert interval([0.71234, 0.9]) == "[0.712, 0.900]"
    assert interval((np.float64(-0.05), 0.0)) == "[-0.050, 0.000]"


def test_percentages_drop_needless_digits():
    assert [pct(f) for f in (0.1, 0.25, 1.0, 0.125)] == ["10%", "25%", "100%", "12.5%"]


def test_cells_are_safe_in_markdown_tables_and_html():
    assert cell("a|b\nc <i>&") == "a\\|b c &lt;i&gt;&amp;"
    assert cell(None) == "None" and cell(3) == "3"


def test_table_lines_end_with_a_blank_line():
    assert table(["A", "B"], [["1", "2"], ["3", "4"]]) == ["| A | B |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |", ""]
    assert table(["Only"], []) == ["| Only |", "|---|", ""]


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    ax = fig.add_subplot()
    ax.imshow(np.random.default_rng(0).random((40, 40)), cmap="viridis")
    return fig


def test_png_is_quantised_to_256_colours_unless_told_not_to():
    quantised, plain = formatting.png(_figure()), formatting.png(_figure(), quantise=False)
    for data in (quantised, plain):
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    q, p = Image.open(io.BytesIO(quantised)), Image.open(io.BytesIO(plain))
    assert q.mode == "P" and p.mode == "RGBA" and q.size == p.size == (220, 165)  # 2 x 1.5 in at 110 dpi
    assert formatting.png(_figure(), quantise=False) == plain  # deterministic: reports are byte-stable
    assert Image.open(io.BytesIO(formatting.png(_figure(), dpi=55))).size == (110, 82)


def test_importing_it_loads_neither_torch_nor_matplotlib_nor_pil():
    code = ("import sys, pipeline.formatting; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
