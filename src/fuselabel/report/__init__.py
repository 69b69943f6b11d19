"""``fuselabel report``: one self-contained HTML file about a model (or several) on labelled rows.

Three steps, each usable alone: :func:`summarize` computes every figure's numbers from arrays (truth,
probabilities, per-head parts, thresholds, names, the model's task) into a plain dict; :func:`draw` draws it
(fuselabel.figures); and :func:`write_report` writes one HTML file from the package's templates with every
figure (PNG at twice the screen's density) and photo thumbnail (small JPEG) inside it, so the file alone can
be mailed, archived or opened offline. :func:`build_report` runs a model over a table and does all three;
:func:`build_comparison` runs several models over the same rows and writes one page comparing them
(:func:`compare` from arrays).

Modules: ``summary`` (the numbers), ``comparison`` (several models), ``provenance`` (the model, its inputs and
the rows), ``page`` (figures and templates), ``build`` (models over a table, and writing the file).
"""

from .build import build_comparison, build_report, report_target, short_names, write_report
from .comparison import compare
from .page import comparison_html, draw, figure_html, report_html
from .provenance import describe_run, fusion
from .summary import read_history, summarize

__all__ = [
    "build_comparison",
    "build_report",
    "compare",
    "comparison_html",
    "describe_run",
    "draw",
    "figure_html",
    "fusion",
    "read_history",
    "report_html",
    "report_target",
    "short_names",
    "summarize",
    "write_report",
]
