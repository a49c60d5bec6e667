import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from _tiny import write_study

from paretoslim.search import ParetoslimError, load_spec, run_study
from paretoslim.search._export import load_program
from paretoslim.search._verify import verify_artifact
from paretoslim.search.cli import main

pytestmark = pytest.mark.xdist_group("shipped-study")  # its tiny study is run once


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

    result = verify_artifact(out, "task.py:make_task", min_calls=20)
    assert result["quality_ok"] and result["task"] == "task.py:make_task"
    assert result["quality"] == pytest.approx(meta["recorded"]["quality"], abs=0.002)
    assert result["size_mb"] == pytest.approx(meta["recorded"]["size_mb"], rel=0.05)
    assert result["latency_ms"] > 0 and result["speedup"] > 0

    assert main(["verify", str(out), "--spec", "study.toml", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"quality", "latency_ms", "size_mb", "recorded"} <= set(shown)

    # a recorded figure that the artifact does not reproduce fails verification
    meta["recorded"]["quality"] -= 0.05
    (out / "metrics.json").write_text(json.dumps(meta))
    assert main(["verify", str(out), "--trust-recorded-task"]) == 1
    captured = capsys.readouterr()
    assert "QUALITY DIFFERS" in captured.out
    assert "trusting the task recorded in" in captured.err and "task.py:make_task" in captured.err


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


@pytest.fixture(scope="module")
def artifact(study_dir):
    """Trial 0 of the tiny study, exported once; copy it before changing it."""
    cwd = os.getcwd()
    os.chdir(study_dir)
    try:
        assert main(["export", "tiny", "--trial", "0", "--out", "artifact"]) == 0
    finally:
        os.chdir(cwd)
    return study_dir / "artifact"


def _copy(artifact, tmp_path):
    import shutil

    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_verify_runs_no_code_named_in_the_artifact(in_study, artifact, tmp_path, capsys):
    out = _copy(artifact, tmp_path)
    marker = tmp_path / "ran"
    meta = json.loads((out / "metrics.json").read_text())
    meta["task"] = {"reference": "os:system", "base_dir": str(tmp_path),
                    "options": {"command": f"touch {marker}"}}
    (out / "metrics.json").write_text(json.dumps(meta))
    capsys.readouterr()

    assert main(["verify", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "--task REF or --spec FILE" in line and "'os:system'" in line
    assert not marker.exists()
    # the task comes from the user; the recorded one is not touched
    assert main(["verify", str(out), "--task", "task.py:make_task", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "task.py:make_task"
    assert not marker.exists()


def _rewrite(path: Path, extra: dict[str, bytes], constants: dict | None = None) -> None:
    """Rewrite the zip at ``path`` with ``extra`` entries (below its top folder) and more
    entries in its constants config."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    top = next(iter(entries)).split("/")[0]
    if constants:
        name = f"{top}/data/constants/model_constants_config.json"
        config = json.loads(entries[name])
        config["config"].update(constants)
        entries[name] = json.dumps(config).encode()
    entries.update({f"{top}/{name}": data for name, data in extra.items()})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_program_archive_carrying_a_pickle_is_refused_before_loading(in_study, artifact,
                                                                       tmp_path, capsys):
    import pickle

    out = _copy(artifact, tmp_path)
    marker = tmp_path / "ran"
    _rewrite(out / "model.pt2", {"data/constants/opaque_obj_0": pickle.dumps(_Touch(marker))},
             constants={"evil": {"path_name": "opaque_obj_0", "is_param": False,
                                 "use_pickle": True, "tensor_meta": None}})
    with pytest.raises(ParetoslimError, match="refused before loading: constant 'evil'"):
        load_program(out / "model.pt2")
    assert not marker.exists()
    capsys.readouterr()
    assert main(["verify", str(out), "--task", "task.py:make_task"]) == 2
    assert "refused before loading" in _one_line(capsys.readouterr().err)
    assert not marker.exists()


@pytest.mark.parametrize("extra, constants, message", [
    ({"data/constants/custom_obj_0": b"\x80\x04N."},
     {"obj": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True,
              "tensor_meta": None}}, "constant 'obj' is stored as 'custom_obj_0'"),
    ({"data/payload.pkl": b"PK"}, None, "data/payload.pkl, which is not part of"),
    ({"data/aotinductor/model/model.so": b"\x7fELF"}, None, "aotinductor"),
    ({"models/other.json": b"\x80\x04N."}, None, "is a pickle"),
    ({"data/weights/model.pt": b"PK"}, None, "data/weights/model.pt, which is not part of"),
])
def test_program_archives_with_code_in_them_are_refused(artifact, tmp_path, extra, constants,
                                                        message):
    from paretoslim.search._archive import check_program_archive

    out = _copy(artifact, tmp_path)
    check_program_archive(out / "model.pt2")  # the export as written passes
    _rewrite(out / "model.pt2", extra, constants)
    with pytest.raises(ParetoslimError, match=message.replace("(", r"\(")):
        check_program_archive(out / "model.pt2")


@pytest.mark.parametrize("change, message", [
    (lambda meta: "{not json", "not a metrics file written by export"),
    (lambda meta: [1, 2], "not a metrics file written by export"),
    (lambda meta: {**meta, "recorded": {}}, "no recorded quality"),
    (lambda meta: {**meta, "latency": {**meta["latency"], "threads": "many"}},
     "'latency.threads' must be int"),
    (lambda meta: {**meta, "latency": {**meta["latency"], "min_seconds": float("nan")}},
     "latency.min_seconds must be a finite number"),
    (lambda meta: {**meta, "scheme": "int3"}, "scheme must be one of"),
])
def test_verify_exits_2_for_a_bad_metrics_file(in_study, artifact, tmp_path, capsys, change,
                                               message):
    out = _copy(artifact, tmp_path)
    changed = change(json.loads((out / "metrics.json").read_text()))
    (out / "metrics.json").write_text(changed if isinstance(changed, str)
                                      else json.dumps(changed))
    capsys.readouterr()
    assert main(["verify", str(out), "--task", "task.py:make_task"]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_verify_without_a_recorded_task_to_trust_exits_2(in_study, artifact, tmp_path, capsys):
    out = _copy(artifact, tmp_path)
    meta = json.loads((out / "metrics.json").read_text())
    del meta["task"]
    (out / "metrics.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["verify", str(out), "--trust-recorded-task"]) == 2
    assert "no task recorded" in _one_line(capsys.readouterr().err)


def _rewrite_program(path: Path, change) -> None:
    """Rewrite the program JSON (``models/model.json``) of the archive at ``path``."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in entries if n.endswith("/models/model.json"))
    entries[name] = json.dumps(change(json.loads(entries[name]))).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)


def _in_expression(program: dict, command: str) -> dict:
    text = json.dumps(program)
    assert "\"Symbol('" in text, "the tiny export has no dynamic dimension to carry a payload"
    return json.loads(text.replace("\"Symbol('", f"\"0*__import__('os').system('{command}') "
                                                 "+ Symbol('", 1))


def _in_guard(program: dict, command: str) -> dict:
    return {**program, "guards_code": [f"__import__('os').system('{command}') == 0"]}


def _in_target(program: dict, command: str) -> dict:
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": command}, "kind": 1}]
    return program


_PROGRAM_PAYLOADS = {"shape expression": _in_expression, "guard": _in_guard,
                     "node target": _in_target}


@pytest.mark.parametrize("kind", ["shape expression", "guard"])
def test_torch_export_load_alone_runs_code_in_the_program_json(artifact, tmp_path, kind):
    """What the check below guards against: torch's own loader runs these payloads."""
    out = _copy(artifact, tmp_path)
    marker = tmp_path / "ran"
    _rewrite_program(out / "model.pt2", lambda p: _PROGRAM_PAYLOADS[kind](p, f"touch {marker}"))
    code = (f"import torch; m = torch.export.load({str(out / 'model.pt2')!r}).module(); "
            "m(torch.randn(2, 16))")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists()


@pytest.mark.parametrize("kind", list(_PROGRAM_PAYLOADS))
def test_code_in_the_program_json_is_refused_by_every_verb_that_loads_it(in_study, artifact,
                                                                         tmp_path, capsys,
                                                                         kind):
    out = _copy(artifact, tmp_path)
    marker = tmp_path / "ran"
    _rewrite_program(out / "model.pt2", lambda p: _PROGRAM_PAYLOADS[kind](p, f"touch {marker}"))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2  # refused for the missing task, nothing loaded
    assert "--task REF or --spec FILE" in _one_line(capsys.readouterr().err)
    for how in (["--task", "task.py:make_task"], ["--spec", "study.toml"],
                ["--trust-recorded-task"]):
        assert main(["verify", str(out), *how]) == 2
        err = capsys.readouterr().err
        if how == ["--trust-recorded-task"]:  # it names the task it trusts first
            err = err.split("\n", 1)[1]
        line = _one_line(err)
        assert "refused before loading" in line and kind in line, line
    assert not marker.exists()


def test_export_replaces_a_link_in_the_output_folder_instead_of_writing_through_it(in_study,
                                                                                    tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("card.md", "metrics.json", "model.pt2"):
        (out / name).symlink_to(victim)
    assert main(["export", "tiny", "--trial", "0", "--out", str(out)]) == 0
    assert victim.read_text() == "keep me"
    for name in ("card.md", "metrics.json", "model.pt2"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert not list(out.glob(".*"))  # no temporary file left behind
