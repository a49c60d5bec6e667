import asyncio
import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import optuna
import pytest
from _tiny import recorded_study
from optuna.trial import TrialState

from paretoslim.search import ParetoslimError
from paretoslim.search._record import TrialRecord
from paretoslim.search._report import write_report
from paretoslim.search._report_data import (
    MIN_TRIALS_FOR_IMPORTANCE,
    hypervolume,
    report_data,
)
from paretoslim.search._store import StudyStore
from paretoslim.search.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")

BASELINE = {"quality": 0.93, "latency_ms": 10.0, "size_mb": 2.0}
MAX_DROP = 0.02
# (quality, latency_ms, size_mb) or None for a failed trial. Feasible when
# 0.93 - quality <= 0.02; the feasible Pareto set is {0, 3, 5}.
DESIGN = [
    (0.92, 5.0, 1.0),
    (0.912, 6.0, 1.2),  # dominated by 0
    (0.80, 1.0, 0.2),   # infeasible: would dominate everything on latency and size
    (0.925, 8.0, 1.5),
    None,
    (0.915, 3.0, 0.5),
    (0.90, 9.0, 1.9),   # infeasible
]
FRONT = {0, 3, 5}


def _record(trial, quality, latency, size, recipe):
    drop = BASELINE["quality"] - quality
    StudyStore.write(trial, TrialRecord(recipe=recipe, metrics={
        "quality": quality, "latency_ms": latency, "size_mb": size,
        **{f"baseline_{k}": v for k, v in BASELINE.items()},
        "quality_drop": drop, "speedup": BASELINE["latency_ms"] / latency,
        "compression": BASELINE["size_mb"] / size,
    }))
    trial.set_constraint("max_quality_drop", drop - MAX_DROP)


def _new_study(name="tiny", seed=0):
    return recorded_study(name, sampler=optuna.samplers.RandomSampler(seed))


def _design_study():
    study = _new_study()
    for k, row in enumerate(DESIGN):
        trial = study.ask()
        width = trial.suggest_float("student.width", 0.5, 1.0, step=0.25)
        scheme = trial.suggest_categorical("quantization.scheme", ["fp32", "int8_static"])
        recipe = {"student": {"width": width}, "pruning": {"ratio": 0.05 * k},
                  "quantization": {"scheme": scheme}}
        if row is None:
            StudyStore.write(trial, TrialRecord(recipe=recipe,
                                                failure="compiled model disagrees with eager"))
            study.tell(trial, state=TrialState.FAIL)
            continue
        _record(trial, *row, recipe)
        study.tell(trial, list(row))
    return study


def _random_study(n, seed=0, constant_size=False):
    """Latency depends only on pruning.ratio, quality only on student.width."""
    rng = np.random.default_rng(seed)
    study = _new_study("random", seed)
    for _ in range(n):
        trial = study.ask()
        width = trial.suggest_float("student.width", 0.5, 1.0, step=0.125)
        ratio = trial.suggest_float("pruning.ratio", 0.0, 0.7, step=0.05)
        scheme = trial.suggest_categorical("quantization.scheme", ["fp32", "int8_static"])
        quality = 0.80 + 0.13 * width + rng.normal(0, 0.002)
        latency = 10.0 * (1.0 - ratio) + rng.normal(0, 0.05)
        size = 1.0 if constant_size else 2.0 * width * (1.0 - ratio) + 0.01
        _record(trial, quality, latency, size, {"student": {"width": width},
                                                "pruning": {"ratio": ratio},
                                                "quantization": {"scheme": scheme}})
        study.tell(trial, [quality, latency, size])
    return study


@pytest.fixture(scope="module")
def study():
    return _design_study()


@pytest.fixture(scope="module")
def page(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert write_report(study, out, png=False) == [out]
    return out


def test_plot_data_marks_pareto_infeasible_baseline_and_hover(study):
    data = report_data(study)
    assert data.objectives == ("quality", "latency_ms", "size_mb")
    assert data.maximize == (True, False, False)
    assert (data.completed, data.failed) == (6, 1)
    assert data.failures == ((4, "compiled model disagrees with eager"),)
    assert {p.number for p in data.points if p.pareto} == FRONT
    assert {p.number for p in data.front} == FRONT
    assert {p.number for p in data.points if not p.feasible} == {2, 6}
    assert data.baseline == (0.93, 10.0, 2.0)
    assert data.max_quality_drop == pytest.approx(MAX_DROP)
    by_number = {p.number: p for p in data.points}
    assert "prune=0.15" in by_number[3].hover
    for p in data.points:
        assert f"trial {p.number}" in p.hover
        assert ("infeasible" in p.hover) == (not p.feasible)
    assert "speedup 2.00x" in by_number[0].hover
    assert "compression 2.0x" in by_number[0].hover


def test_recipe_in_hover_is_the_short_form(study):

    data = report_data(study)
    for trial, point in zip(study.get_trials(states=(TrialState.COMPLETE,)), data.points,
                            strict=True):
        assert StudyStore.record(trial).parsed_recipe().short() in point.hover


def test_pair_front_is_the_front_of_two_objectives_among_feasible_trials(study):
    data = report_data(study)
    # quality (max) vs latency (min): 3 (best quality), 0, 5 (fastest feasible)
    assert [p.number for p in data.pair_front(1, 0)] == [5, 0, 3]
    # latency vs size, both minimized: 5 dominates every other feasible trial
    assert [p.number for p in data.pair_front(1, 2)] == [5]


def test_hypervolume_of_known_boxes():
    ref = (4.0, 4.0)
    assert hypervolume([(1.0, 3.0), (3.0, 1.0)], ref) == pytest.approx(3 + 3 - 1)
    assert hypervolume([(1.0, 3.0), (2.0, 3.5), (5.0, 0.0)], ref) == pytest.approx(3.0)
    cube = [(1.0, 1.0, 1.0), (0.0, 2.0, 2.0), (2.0, 0.0, 2.0)]
    # inclusion-exclusion: three boxes, three pairwise overlaps, one triple overlap
    assert hypervolume(cube, (3.0, 3.0, 3.0)) == pytest.approx(8 + 3 + 3 - 2 - 2 - 1 + 1)
    assert hypervolume([], (1.0, 1.0, 1.0)) == 0.0


def test_hypervolume_history_never_decreases_and_matches_optuna():
    study = _random_study(30)
    hv = report_data(study).hypervolume
    assert hv.trial_numbers == tuple(range(30))
    assert all(b >= a for a, b in zip(hv.values, hv.values[1:], strict=False))
    assert hv.values[-1] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_fig = optuna.visualization.plot_hypervolume_history(study, hv.reference)
    np.testing.assert_allclose(hv.values, optuna_fig.data[0].y, rtol=1e-9)


def test_hypervolume_ignores_infeasible_trials(study):
    hv = report_data(study).hypervolume
    values = dict(zip(hv.trial_numbers, hv.values, strict=True))
    assert values[0] > 0
    assert values[2] == values[1]  # trial 2 is infeasible
    assert values[6] == values[5]
    assert 4 not in values  # failed


def test_reference_point_is_worse_than_every_trial_and_the_teacher(study):
    data = report_data(study)
    quality, latency, size = data.hypervolume.reference
    assert quality < min(p.values[0] for p in data.points)
    assert latency > BASELINE["latency_ms"] and size > BASELINE["size_mb"]


def test_importance_ranks_the_parameter_that_drives_each_objective():
    data = report_data(_random_study(40))
    importance = {imp.objective: imp for imp in data.importances}
    assert importance["quality"].values[0][0] == "student.width"
    assert importance["latency_ms"].values[0][0] == "pruning.ratio"
    for imp in data.importances:
        assert sum(v for _, v in imp.values) == pytest.approx(1.0)
        assert not imp.note


def test_importance_of_a_maximized_objective_looks_at_its_highest_values():
    """High quality needs little pruning; among low-quality trials only the width matters."""
    rng = np.random.default_rng(0)
    study = _new_study("asymmetric")
    for _ in range(40):
        trial = study.ask()
        width = trial.suggest_float("student.width", 0.5, 1.0, step=0.125)
        ratio = trial.suggest_float("pruning.ratio", 0.0, 0.7, step=0.05)
        quality = (0.93 if ratio <= 0.1 else 0.90 - 0.05 * (1.0 - width)) + rng.normal(0, 1e-3)
        _record(trial, quality, 5.0, 1.0, {"student": {"width": width},
                                            "pruning": {"ratio": ratio}})
        study.tell(trial, [quality, 5.0 + rng.normal(0, 0.1), 1.0 + rng.normal(0, 0.01)])
    quality = report_data(study).importances[0]
    assert quality.objective == "quality"
    assert quality.values[0][0] == "pruning.ratio"


def test_importance_notes_instead_of_crashing(study):
    few = report_data(study).importances
    assert all(not imp.values and str(MIN_TRIALS_FOR_IMPORTANCE) in imp.note for imp in few)

    constant = _new_study("constant")
    for k in range(MIN_TRIALS_FOR_IMPORTANCE + 2):
        trial = constant.ask()
        trial.suggest_float("student.width", 0.5, 0.5)
        _record(trial, 0.92, 5.0 + k, 1.0, {"student": {"width": 0.5}})
        constant.tell(trial, [0.92, 5.0 + k, 1.0])
    notes = [imp.note for imp in report_data(constant).importances]
    assert all("no searched parameter" in note for note in notes)

    flat = _random_study(MIN_TRIALS_FOR_IMPORTANCE + 2, constant_size=True)
    imp = {imp.objective: imp for imp in report_data(flat).importances}
    assert imp["latency_ms"].values
    assert not imp["size_mb"].values and "same in every trial" in imp["size_mb"].note


def test_empty_study_writes_a_page_with_notes(tmp_path):
    study = _new_study("empty")
    written = write_report(study, tmp_path / "r.html", png=False)
    text = written[0].read_text()
    assert "no feasible Pareto-optimal trial yet" in text
    assert "no completed trial yet" in text


def test_page_is_self_contained_with_plotly_inline_once(study, page):
    from plotly.offline import get_plotlyjs

    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert text.count(get_plotlyjs()) == 1
    assert text.count("plotly.js v") == 1
    assert "tiny" in text and "6</b> completed" in text and "1</b> failed" in text
    table = re.search(r'<table id="front-table">.*?</table>', text, re.S).group(0)
    assert {int(n) for n in re.findall(r"<tr><td>(\d+)</td>", table)} == FRONT
    for div_id in ("pair-quality-latency_ms", "pair-quality-size_mb",
                   "pair-latency_ms-size_mb", "front-3d", "hypervolume"):
        assert f'id="{div_id}"' in text
    assert "Reference (worst) point" in text
    assert "compiled model disagrees with eager" in text


def test_importing_the_package_does_not_import_plotly():
    code = ("import sys, paretoslim.search, paretoslim.search._report\n"
            "print([m for m in ('plotly', 'kaleido', 'choreographer') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_missing_plotly_says_how_to_install(study, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)
    with pytest.raises(ParetoslimError, match=re.escape("pip install 'paretoslim[plot]'")):
        write_report(study, tmp_path / "r.html", png=False)


def test_missing_kaleido_writes_the_page_and_says_how_to_get_the_png(study, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)
    said = []
    assert write_report(study, tmp_path / "r.html", warn=said.append) == [tmp_path / "r.html"]
    assert len(said) == 1 and "pip install 'paretoslim[plot]'" in said[0]
    assert (tmp_path / "r.html").is_file() and not (tmp_path / "r.png").exists()


def test_png_failure_writes_the_page_and_warns_in_one_line(study, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    said = []
    assert write_report(study, tmp_path / "r.html", warn=said.append) == [tmp_path / "r.html"]
    assert len(said) == 1 and "\n" not in said[0]
    assert "apt-get install chromium" in said[0] and "--no-png" in said[0]
    assert (tmp_path / "r.html").is_file() and not (tmp_path / "r.png").exists()


def test_report_without_a_browser_exits_0_with_the_page_and_a_warning(study, tmp_path,
                                                                      monkeypatch, capsys):
    from plotly.basedatatypes import BaseFigure

    def no_browser(self, *args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nInstall it.")

    monkeypatch.setattr(BaseFigure, "write_image", no_browser)
    monkeypatch.setattr("paretoslim.search._study.resolve_study",
                        lambda ref, storage=None: (study, None))
    out = tmp_path / "r.html"
    assert main(["report", "tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and not out.with_suffix(".png").exists()
    assert captured.out.strip() == f"wrote {out}"
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("paretoslim: warning: no r.png")
    assert "Kaleido requires Google Chrome" in warning[0]


@needs_chromium
def test_png_of_the_main_front(study, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", CHROMIUM)
    html, png = write_report(study, tmp_path / "r.html")
    assert png == tmp_path / "r.png"
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1100, 700)


CHROMIUM_FLAGS = ("--disable-quic", "--disable-background-networking")


async def _load_in_chromium(url, user_data_dir):
    """Open ``url`` in headless Chromium over the DevTools pipe; return what the page did."""
    from choreographer import Browser
    from choreographer.browsers.chromium import Chromium

    class QuietChromium(Chromium):
        # choreographer already passes --headless --no-sandbox --disable-gpu --no-first-run
        # --disable-component-update --disable-sync and --user-data-dir=tmp_dir.
        def get_cli(self):
            return [*super().get_cli(), *CHROMIUM_FLAGS]

    errors, requests = [], []

    async def on_console(event):
        if event["params"]["type"] in ("error", "assert"):
            errors.append(str(event["params"]["args"]))

    async def on_exception(event):
        errors.append(str(event["params"]["exceptionDetails"]))

    async def on_log(event):
        if event["params"]["entry"]["level"] == "error":
            errors.append(event["params"]["entry"]["text"])

    async def on_request(event):
        requests.append(event["params"]["request"]["url"])

    browser = Browser(path=CHROMIUM, browser_cls=QuietChromium, headless=True,
                      tmp_dir=str(user_data_dir))
    try:
        await browser.open()
        tab = browser.get_tab()
        tab.subscribe("Runtime.consoleAPICalled", on_console)
        tab.subscribe("Runtime.exceptionThrown", on_exception)
        tab.subscribe("Log.entryAdded", on_log)
        tab.subscribe("Network.requestWillBeSent", on_request)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await tab.send_command(f"{domain}.enable")
        await tab.send_command("Emulation.setDeviceMetricsOverride", params={
            "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        loaded = tab.subscribe_once("Page.loadEventFired")
        await tab.send_command("Page.navigate", params={"url": url})
        await asyncio.wait_for(loaded, 60)
        counts = {}
        for _ in range(50):
            response = await tab.send_command("Runtime.evaluate", params={
                "expression": "JSON.stringify({plotly: document.querySelectorAll('.plotly')"
                              ".length, svg: document.querySelectorAll('.main-svg').length, "
                              "gl: document.querySelectorAll('#front-3d canvas').length, "
                              "points: document.querySelectorAll('.scatterlayer .point')"
                              ".length, title: document.title, "
                              "Plotly: typeof window.Plotly})",
                "returnByValue": True})
            counts = json.loads(response["result"]["result"]["value"])
            if counts["svg"] and counts["gl"]:
                break
            await asyncio.sleep(0.1)
    finally:
        # also after a failed open: choreographer's pipe threads would keep the process alive
        await browser.close()
    return counts, errors, requests


@needs_chromium
def test_page_renders_in_headless_chromium_without_errors(page, tmp_path):
    counts, errors, requests = asyncio.run(
        _load_in_chromium(page.resolve().as_uri(), tmp_path))
    assert counts["Plotly"] == "object"
    assert counts["title"] == "paretoslim report: tiny"
    assert counts["plotly"] == 5  # 3 pairs, the 3-D view, hypervolume; importance is a note
    assert counts["svg"] > 0 and counts["gl"] > 0
    assert counts["points"] >= 3 * 7  # every completed trial and the teacher, in each pair
    assert errors == []
    assert [u for u in requests if re.match(r"(https?|wss?|ftp):", u)] == []
