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
