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
from ._report_data import Importance, ReportData, TrialPoint, report_data

INSTALL_HINT = "install with: pip install 'paretoslim[plot]'"
_LABELS = {"quality": "quality", "latency_ms": "latency (ms)", "size_mb": "size (MB)"}


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
    figures = _Figures(data, go)
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


def _teacher_hover(data: ReportData) -> str:
    figures = "<br>".join(f"{name} {fmt(name, value)}" for name, value in data.teacher.items())
    return f"<b>teacher (baseline)</b><br>{figures}<extra></extra>"


def _label(name: str, up: bool) -> str:
    return f"{_LABELS.get(name, name)}, {'higher' if up else 'lower'} is better"


_STYLE = {
    "completed": dict(color="#8a96a3", size=8, opacity=0.55),
    "infeasible": dict(color="#d62728", size=8, opacity=0.5, symbol="x"),
    "pareto": dict(color="#1f5fbf", size=12, line=dict(color="#0b2a5c", width=1.5)),
    "teacher": dict(color="#ff8c00", size=18, symbol="star", line=dict(color="#7a4300",
                                                                          width=1)),
}


class _Figures:
    """The plotly figures of a report, built from its data."""

    def __init__(self, data: ReportData, go: Any) -> None:
        self.data, self.go = data, go
        pairs = data.pairs()
        self.pairs = [(f"pair-{data.objectives[i]}-{data.objectives[j]}", self._pair(j, i))
                      for i, j in pairs]
        if not pairs:
            self.pairs = [(f"history-{data.objectives[0]}", self._history())]
        main = next((k for k, (i, j) in enumerate(pairs)
                     if {data.objectives[i], data.objectives[j]} == {"quality", "latency_ms"}),
                    0)
        self.main = self.pairs[main][1]
        self.cube = self._cube() if len(data.objectives) == 3 else None
        self.hypervolume = self._hypervolume() if data.points else None
        self.importances = [(imp, self._importance(imp)) for imp in data.importances]

    def _layout(self, **kwargs: Any) -> dict[str, Any]:
        layout = dict(template="plotly_white", font=dict(size=13),
                      margin=dict(l=70, r=20, t=80, b=60),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left",
                                  x=0.0))
        layout.update(kwargs)
        if "title" in layout:
            layout["title"] = dict(x=0.0, xref="paper", xanchor="left", **layout["title"])
        return layout

    def _quality_limit(self, fig: Any, x: int, y: int) -> None:
        """A dashed line at the lowest feasible quality, on the quality axis of a pair plot."""
        data = self.data
        if data.max_quality_drop is None or "quality" not in data.teacher:
            return
        limit = data.teacher["quality"] - data.max_quality_drop
        text = f"feasibility limit (drop {data.max_quality_drop:g})"
        style = dict(line=dict(color="#d62728", width=1, dash="dash"), annotation_text=text,
                     annotation_font=dict(size=11, color="#d62728"))
        if data.objectives[y] == "quality":
            fig.add_hline(y=limit, annotation_position="bottom right", **style)
        elif data.objectives[x] == "quality":
            fig.add_vline(x=limit, annotation_position="top left", **style)

    def _groups(self) -> list[tuple[str, str, list[TrialPoint]]]:
        points = self.data.points
        return [
            ("completed", "completed (feasible)",
             [p for p in points if p.feasible and not p.pareto]),
            ("infeasible", "infeasible", [p for p in points if not p.feasible]),
            ("pareto", "Pareto-optimal", [p for p in points if p.pareto]),
        ]

    def _pair(self, x: int, y: int) -> Any:
        """Objective ``y`` against objective ``x``; the first objective goes on y."""
        go, data = self.go, self.data
        fig = go.Figure()
        for key, name, group in self._groups():
            fig.add_trace(go.Scatter(
                x=[p.values[x] for p in group], y=[p.values[y] for p in group], name=name,
                mode="markers+text" if key == "pareto" else "markers",
                text=[f"#{p.number}" for p in group], textposition="top center",
                textfont=dict(size=11, color="#0b2a5c"), marker=_STYLE[key],
                customdata=[p.hover for p in group], hovertemplate="%{customdata}<extra></extra>",
            ))
        front = data.pair_front(x, y)
        if len(front) > 1:
            fig.add_trace(go.Scatter(
                x=[p.values[x] for p in front], y=[p.values[y] for p in front],
                mode="lines", name="front of this pair", hoverinfo="skip",
                line=dict(color="#1f5fbf", width=1.5, dash="dot",
                          shape="vh" if data.maximize[x] else "hv"),
            ))
        bx, by = data.baseline[x], data.baseline[y]
        if bx is not None and by is not None:
            fig.add_trace(go.Scatter(
                x=[bx], y=[by], name="teacher (baseline)", mode="markers",
                marker=_STYLE["teacher"], hovertemplate=_teacher_hover(data)))
        title = (f"{_LABELS.get(data.objectives[y], data.objectives[y])} vs "
                 f"{_LABELS.get(data.objectives[x], data.objectives[x])}")
        self._quality_limit(fig, x, y)
        fig.update_layout(**self._layout(
            title=dict(text=title),
            xaxis=dict(title=_label(data.objectives[x], data.maximize[x])),
            yaxis=dict(title=_label(data.objectives[y], data.maximize[y]))))
        return fig

    def _history(self) -> Any:
        go, data = self.go, self.data
        fig = go.Figure()
        for key, name, group in self._groups():
            fig.add_trace(go.Scatter(
                x=[p.number for p in group], y=[p.values[0] for p in group], name=name,
                mode="markers", marker=_STYLE[key], customdata=[p.hover for p in group],
                hovertemplate="%{customdata}<extra></extra>"))
        fig.update_layout(**self._layout(
            title=dict(text=f"{data.objectives[0]} by trial"),
            xaxis=dict(title="trial"), yaxis=dict(title=_label(data.objectives[0],
                                                                 data.maximize[0]))))
        return fig

    def _cube(self) -> Any:
        go, data = self.go, self.data
        fig = go.Figure()
        for key, name, group in self._groups():
            marker = dict(_STYLE[key], size=4 if key != "pareto" else 6)
            marker["symbol"] = "circle-open" if key == "infeasible" else "circle"
            fig.add_trace(go.Scatter3d(
                x=[p.values[1] for p in group], y=[p.values[2] for p in group],
                z=[p.values[0] for p in group], name=name, mode="markers", marker=marker,
                customdata=[p.hover for p in group], hovertemplate="%{customdata}<extra></extra>",
            ))
        if all(v is not None for v in data.baseline):
            fig.add_trace(go.Scatter3d(
                x=[data.baseline[1]], y=[data.baseline[2]], z=[data.baseline[0]],
                name="teacher (baseline)", mode="markers",
                marker=dict(color=_STYLE["teacher"]["color"], size=7, symbol="diamond"),
                hovertemplate=_teacher_hover(data)))
        names = [_LABELS.get(n, n) for n in data.objectives]
        fig.update_layout(**self._layout(
            title=dict(text="all three objectives (drag to rotate)"),
            margin=dict(l=0, r=0, t=80, b=0),
            scene=dict(xaxis=dict(title=names[1]), yaxis=dict(title=names[2]),
                       zaxis=dict(title=names[0]), aspectmode="cube",
                       camera=dict(eye=dict(x=-1.5, y=-1.5, z=0.9)))))
        return fig

    def _hypervolume(self) -> Any:
        go, hv = self.go, self.data.hypervolume
        fig = go.Figure(go.Scatter(
            x=list(hv.trial_numbers), y=list(hv.values), mode="lines+markers", name="hypervolume",
            line=dict(shape="hv", color="#1f5fbf"),
            hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>"))
        fig.update_layout(**self._layout(
            title=dict(text="hypervolume over trials"), showlegend=False,
            xaxis=dict(title="trial"), yaxis=dict(title="hypervolume", rangemode="tozero")))
        return fig

    def _importance(self, imp: Importance) -> Any:
        if not imp.values:
            return None
        go = self.go
        names = [k for k, _ in imp.values][::-1]
        values = [v for _, v in imp.values][::-1]
        fig = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color="#1f5fbf",
                               hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
        fig.update_layout(**self._layout(
            showlegend=False, margin=dict(l=170, r=20, t=30, b=50),
            xaxis=dict(title="importance (sums to 1)", rangemode="tozero")))
        return fig


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


def _page(data: ReportData, figures: _Figures, plotlyjs: str) -> str:
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
        label = f"<h3>{e(_LABELS.get(imp.objective, imp.objective))}</h3>"
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
