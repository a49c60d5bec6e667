"""The plotly figures of a study report, built from what ``report_data`` computed."""

from __future__ import annotations

from typing import Any

from ._figures import fmt
from ._report_data import Importance, ReportData, TrialPoint

LABELS = {"quality": "quality", "latency_ms": "latency (ms)", "size_mb": "size (MB)"}


def _teacher_hover(data: ReportData) -> str:
    figures = "<br>".join(f"{name} {fmt(name, value)}" for name, value in data.teacher.items())
    return f"<b>teacher (baseline)</b><br>{figures}<extra></extra>"


def _label(name: str, up: bool) -> str:
    return f"{LABELS.get(name, name)}, {'higher' if up else 'lower'} is better"


_STYLE = {
    "completed": dict(color="#8a96a3", size=8, opacity=0.55),
    "infeasible": dict(color="#d62728", size=8, opacity=0.5, symbol="x"),
    "pareto": dict(color="#1f5fbf", size=12, line=dict(color="#0b2a5c", width=1.5)),
    "teacher": dict(color="#ff8c00", size=18, symbol="star", line=dict(color="#7a4300",
                                                                          width=1)),
}


class Figures:
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
        title = (f"{LABELS.get(data.objectives[y], data.objectives[y])} vs "
                 f"{LABELS.get(data.objectives[x], data.objectives[x])}")
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
        names = [LABELS.get(n, n) for n in data.objectives]
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
