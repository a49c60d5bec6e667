import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from _tiny import write_study

from paretoslim.search import ParetoslimError, load_spec, run_study
from paretoslim.search._export import load_program
from paretoslim.search._verify import verify_artifact
from paretoslim.search.cli import main


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished tiny study (2 trials) in its own directory, as a user would have it."""
    root = tmp_path_factory.mktemp("ship")
    spec_path = write_study(root, trials=2)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_study(load_spec(spec_path), progress=False)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_study(study_dir, monkeypatch):
    monkeypatch.chdir(study_dir)
    return study_dir


def test_export_pick_then_verify(in_study, capsys):
    out = in_study / "picked"
    assert main(["export", "tiny", "--pick", "--max-quality-drop", "0.5", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("picked trial") and "lowest latency_ms" in printed
    for name in ("model.pt2", "recipe.json", "metrics.json", "card.md"):
        assert (out / name).is_file()
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["task"]["reference"] == "task.py:make_task"
    assert meta["onnx"] == "model.onnx" or meta["onnx"].startswith("skipped")

    result = verify_artifact(out, min_calls=20)
    assert result["quality_ok"]
    assert result["quality"] == pytest.approx(meta["recorded"]["quality"], abs=0.002)
    assert result["size_mb"] == pytest.approx(meta["recorded"]["size_mb"], rel=0.05)
    assert result["latency_ms"] > 0 and result["speedup"] > 0

    assert main(["verify", str(out), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"quality", "latency_ms", "size_mb", "recorded"} <= set(shown)

    # a recorded figure that the artifact does not reproduce fails verification
    meta["recorded"]["quality"] -= 0.05
    (out / "metrics.json").write_text(json.dumps(meta))
    assert main(["verify", str(out)]) == 1
    assert "QUALITY DIFFERS" in capsys.readouterr().out


def test_exported_program_loads_without_pickle_fallback(in_study, tmp_path):
    out = tmp_path / "t0"
    assert main(["export", "tiny", "--trial", "0", "--out", str(out)]) == 0
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    module = load_program(out / "model.pt2")
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
    import torch

    assert module(torch.randn(5, 16)).shape == (5, 4)


def test_verify_rejects_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ParetoslimError, match="not an exported trial"):
        verify_artifact(tmp_path)


def test_front_to_parquet_and_files(in_study, tmp_path, capsys):
    path = tmp_path / "front.parquet"
    assert main(["front", "tiny", "--format", "parquet", "--out", str(path)]) == 0
    frame = pd.read_parquet(path)
    assert {"trial", "quality", "latency_ms", "size_mb", "speedup", "recipe"} <= set(frame)
    assert main(["front", "tiny", "--format", "parquet"]) == 2
    assert "add --out" in capsys.readouterr().err
    assert main(["front", "tiny", "--sort", "size_mb", "--out", str(tmp_path / "f.txt")]) == 0
    assert "trial" in (tmp_path / "f.txt").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_loopback(in_study):
    pytest.importorskip("optuna_dashboard")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "paretoslim.search.cli", "dashboard",
                             "tiny", "--port", str(port)], cwd=in_study,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline, body = time.monotonic() + 30, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer within 30 s"
        assert [s["study_name"] for s in body["study_summaries"]] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
