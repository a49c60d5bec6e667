import json

from paretoslim.search.cli import main


def test_bench_kernels_json_has_the_documented_fields(capsys):
    assert main(["bench", "kernels", "--quick", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in rows}
    assert any("int8" in n for n in names) and any("sparse" in n for n in names)
    for row in rows:
        assert {"name", "threads", "gops", "peak_gops", "fraction_of_peak",
                "speedup_vs_fp32", "peak_source", "executed_gops"} <= set(row)
        assert row["threads"] == 1 and row["gops"] > 0
        assert abs(row["fraction_of_peak"] - row["executed_gops"] / row["peak_gops"]) < 1e-6
        assert row["fraction_of_peak"] <= 1.05
        assert row["peak_source"] == "measured" or row["peak_source"].startswith("table:")


def test_bench_rejects_bad_threads(capsys):
    assert main(["bench", "kernels", "--threads", "0"]) == 2
    assert "--threads must be in [1, 1024]" in capsys.readouterr().err


def test_bench_latency_builds_the_model_a_study_then_loads(tmp_path, monkeypatch, capsys):
    """The model is built ahead of the study, cached under the target's key; a second call
    times nothing new."""
    from _tiny import write_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARETOSLIM_CACHE", str(tmp_path / "cache"))
    spec = write_study(tmp_path)
    assert main(["bench", "latency", str(spec), "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["layers"] > 0 and first["measurements"] == 0
    assert (tmp_path / "cache" / "latency").is_dir()
    assert first["path"].startswith(str(tmp_path / "cache"))
    assert main(["bench", "latency", str(spec), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == first["layers"]


def test_bench_latency_needs_a_spec_and_kernels_takes_none(capsys):
    assert main(["bench", "latency"]) == 2
    assert "bench latency needs a study SPEC" in capsys.readouterr().err
    assert main(["bench", "kernels", "study.toml"]) == 2
    assert "bench kernels takes no SPEC" in capsys.readouterr().err
