"""A study as one offline HTML page: Pareto fronts, hypervolume, parameter importance, table.

The page renders with plotly what ``report_data`` computed (see ``_report_data``)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from ._errors import ParetoslimError
from ._figures import fmt
from ._front import front_frame
from ._pareto import FrontPoint
from ._report_data import ReportData, report_data
from ._report_plots import LABELS, Figures

INSTALL_HINT = "install with: pip install 'paretoslim[plot]'"


def _plotly() -> tuple[Any, str]:
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ParetoslimError(f"the HTML report needs plotly; {INSTALL_HINT}") from None
    return go, get_plotlyjs()


def write_report(study: optuna.Study, out: str | Path, *, png: bool = True,
                 warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write the report of ``study`` to the HTML file ``out`` and, with ``png``, its main front
    plot (quality vs latency) to ``out`` with suffix ``.png``. Returns the files written.

    The page is self-contained (plotly.js inline once) and opens offline. Raises
    ParetoslimError when plotly is missing. The PNG is optional: when kaleido is missing or
    cannot draw it (it needs Chrome or Chromium), the page is still written and
    ``warn(message)`` (default: ``warnings.warn``) says in one line how to get the PNG.
    """
    out = Path(out)
    if out.is_dir():
        raise ParetoslimError(f"{out} is a directory; give the report's file name, e.g. "
                              f"{out / 'report.html'}")
    go, plotlyjs = _plotly()
    data = report_data(study)
    figures = Figures(data, go)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(data, figures, plotlyjs), encoding="utf-8")
    written = [out]
    if png:
        try:
            written.append(_write_png(figures.main, out.with_suffix(".png")))
        except PngUnavailable as exc:
            (warn or _warn)(str(exc))
    return written


class PngUnavailable(Exception):
    """The PNG of the front cannot be drawn here; the message says how to get it."""


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _write_png(figure: Any, path: Path) -> Path:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise PngUnavailable(f"no {path.name}: the PNG needs kaleido; {INSTALL_HINT}, or pass "
                             "--no-png") from None
    try:
        figure.write_image(str(path), width=1100, height=700)
    except Exception as exc:  # kaleido and the browser fail in many ways; all are reported
        path.unlink(missing_ok=True)
        raise PngUnavailable(
            f"no {path.name}: kaleido could not draw it ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); it needs Chrome or Chromium: install one "
            "(Debian/Ubuntu: apt-get install chromium; elsewhere: kaleido_get_chrome), set "
            "BROWSER_PATH to its executable, or pass --no-png") from None
    return path


_CSS = """
html { overflow-y: scroll; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #1d2733; max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #dde3ea; }
.summary { color: #3b4a5a; line-height: 1.6; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 16px; }
.grid3 { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr));
         gap: 16px; }
.note { color: #6b7885; font-style: italic; padding: 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e6eaef; text-align: right; }
th { background: #f3f6f9; } td.text, th.text { text-align: left; }
td.reason { text-align: left; white-space: pre-wrap; word-break: break-word; max-width: 900px; }
"""


def _div(fig: Any, div_id: str, height: int) -> str:
    return fig.to_html(include_plotlyjs=False, full_html=False, div_id=div_id,
                       default_height=f"{height}px",
                       config={"displaylogo": False, "responsive": True})


def _page(data: ReportData, figures: Figures, plotlyjs: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>paretoslim report: {e(data.study_name)}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{plotlyjs}</script>',
        "</head><body>",
        f"<h1>paretoslim report: {e(data.study_name)}</h1>",
        f'<p class="summary">{_summary(data)}</p>',
        "<h2>Pareto-optimal configurations</h2>", _front_table(data.front, data.completed),
        "<h2>Pareto fronts</h2>",
        '<p class="summary">Each plot puts two objectives against each other. Grey: completed '
        "feasible trials; red x: infeasible trials"
        + (f" (quality drop above {data.max_quality_drop:g})"
           if data.max_quality_drop is not None else "")
        + "; blue, numbered: Pareto-optimal on all objectives (in one projection such a point "
        "can look dominated); dotted line: the front of that pair alone; orange star: the "
        "teacher. Hover a point for its trial, figures and recipe.</p>",
        '<div class="grid">',
        *(_div(fig, div_id, 520) for div_id, fig in figures.pairs),
        _div(figures.cube, "front-3d", 520) if figures.cube is not None else "",
        "</div>",
        "<h2>Hypervolume over trials</h2>", _hypervolume_text(data),
    ]
    if figures.hypervolume is not None:
        parts.append(_div(figures.hypervolume, "hypervolume", 420))
    parts += [
        "<h2>Which parameters drive each objective</h2>",
        '<p class="summary">Optuna\'s parameter importance (PED-ANOVA) per objective: how much '
        "each searched parameter's distribution among the best trials for that objective "
        "differs from its distribution over all completed trials.</p>",
        '<div class="grid3">',
    ]
    for imp, fig in figures.importances:
        label = f"<h3>{e(LABELS.get(imp.objective, imp.objective))}</h3>"
        if fig is None:
            parts.append(f'<div>{label}<p class="note">{e(imp.note)}</p></div>')
        else:
            parts.append(f"<div>{label}{_div(fig, f'importance-{imp.objective}', 300)}</div>")
    parts.append("</div>")
    if data.failures:
        rows = "".join(f"<tr><td>{n}</td><td class=\"reason\">{e(reason)}</td></tr>"
                       for n, reason in data.failures)
        parts += ["<h2>Failed trials</h2>",
                  f'<table><tr><th>trial</th><th class="text">reason</th></tr>{rows}</table>']
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(data: ReportData) -> str:
    feasible = sum(p.feasible for p in data.points)
    directions = ", ".join(f"{n} ({'max' if up else 'min'})"
                           for n, up in zip(data.objectives, data.maximize, strict=True))
    text = (f"<b>{data.completed}</b> completed trials ({feasible} feasible, "
            f"{data.completed - feasible} infeasible), <b>{data.failed}</b> failed; "
            f"{len(data.front)} Pareto-optimal. Objectives: {html.escape(directions)}.")
    if data.max_quality_drop is not None:
        text += f" Feasible when the quality drop is at most {data.max_quality_drop:g}."
    teacher = data.teacher
    if teacher:
        figures = []
        if "quality" in teacher:
            figures.append(f"quality {fmt('quality', teacher['quality'])}")
        if "latency_ms" in teacher:
            figures.append(f"latency {fmt('latency_ms', teacher['latency_ms'])} ms")
        if "size_mb" in teacher:
            figures.append(f"size {fmt('size_mb', teacher['size_mb'])} MB")
        text += (f"<br>Teacher (baseline): {', '.join(figures)} (median of the "
                 f"{data.teacher_measurements} measurements taken alongside the trials).")
    return text


def _hypervolume_text(data: ReportData) -> str:
    if not data.points:
        return '<p class="note">no completed trial yet</p>'
    corner = ", ".join(f"{n} {v:.4g}" for n, v in
                       zip(data.objectives, data.hypervolume.reference, strict=True))
    return ('<p class="summary">Volume of objective space dominated by the feasible completed '
            "trials so far (in the product of the objectives' units); it never decreases. "
            f"Reference (worst) point: {html.escape(corner)}, i.e. for each objective the "
            "worst value seen (teacher included) made worse by 10% of the range seen.</p>")


def _front_table(front: tuple[FrontPoint, ...], completed: int) -> str:
    if not front:
        return (f'<p class="note">no feasible Pareto-optimal trial yet ({completed} completed)'
                "</p>")
    frame = front_frame(list(front)).sort_values("quality", ascending=False)
    columns = [("trial", "trial"), ("quality", "quality"), ("quality_drop", "drop"),
               ("latency_ms", "latency (ms)"), ("speedup", "speedup"), ("size_mb", "size (MB)"),
               ("compression", "compression"), ("recipe", "recipe")]
    head = "".join(f'<th{" class=text" if key == "recipe" else ""}>{label}</th>'
                   for key, label in columns)
    rows = []
    for _, row in frame.iterrows():
        cells = [f"<td>{int(row['trial'])}</td>"]
        cells += [f"<td>{fmt(key, row[key])}</td>" for key, _ in columns[1:-1]]
        cells.append(f'<td class="text">{html.escape(str(row["recipe"]))}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="front-table"><tr>{head}</tr>{"".join(rows)}</table>'
