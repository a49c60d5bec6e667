import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from paretoslim.kernels import Target
from paretoslim.kernels._bench import (
    GEMM_PATHS,
    LOWRANK_PATH,
    OPS_PER_CYCLE,
    BenchRow,
    Case,
    _isa_for,
    _masked,
    break_even,
    build_case,
    case_error,
    measure_peak,
    render_bench,
    run_kernel_bench,
    tolerance,
)

REQUIRED = ("name", "threads", "gops", "peak_gops", "fraction_of_peak", "speedup_vs_fp32")
EAGER_PATHS = [p for p in GEMM_PATHS if "inductor" not in p and p not in
               ("int8_static_pt2e", "int8_dynamic_torchao")]


@pytest.fixture(scope="module")
def quick_rows():
    torch._dynamo.reset()
    return run_kernel_bench(threads=1, quick=True, progress=False)


@pytest.fixture
def small():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 128, generator=gen) / 128**0.5, torch.randn(16, 128, generator=gen)


def test_quick_run_has_a_consistent_row_for_every_path(quick_rows):
    names = {r.name for r in quick_rows}
    expected = {*GEMM_PATHS, "sparse_csr", "sparse_bsr16", "sparse_bsr32", LOWRANK_PATH}
    assert expected <= names, f"missing paths: {expected - names}"
    for r in quick_rows:
        assert r.threads == 1 and r.isa in OPS_PER_CYCLE and r.kernel
        assert math.isfinite(r.gops) and r.gops > 0 and r.peak_gops > 0 and r.calls > 0
        assert r.fraction_of_peak == pytest.approx(r.gops / r.peak_gops)
        flops = 2 * r.m * r.rank * (r.k + r.n) if r.rank else 2 * r.m * r.k * r.n
        assert r.gops == pytest.approx(flops / (r.median_ms * 1e-3) / 1e9)
        assert r.speedup_vs_fp32 is not None and r.speedup_vs_fp32 > 0
        if r.name == "fp32_eager":
            assert r.speedup_vs_fp32 == 1.0
    for r in quick_rows:
        if r.name.startswith("sparse"):
            assert r.group == "sparse" and r.flop_basis == "dense-equivalent"
            assert 0 < r.sparsity < 1 and (r.block in (16, 32)) == r.name.startswith("sparse_bsr")
        if r.name == LOWRANK_PATH:
            assert r.group == "lowrank" and 1 <= r.rank <= min(r.k, r.n)


def test_quick_run_peaks_follow_the_isa_and_clock(quick_rows):
    peak = measure_peak()
    for r in quick_rows:
        assert r.clock_ghz == peak.clock_ghz
        assert r.peak_gops == pytest.approx(r.threads * peak.clock_ghz * OPS_PER_CYCLE[r.isa])
        assert f"{OPS_PER_CYCLE[r.isa]} op/cycle" in r.assumption


def test_every_benchmarked_path_matches_fp32(quick_rows):
    for r in quick_rows:
        assert r.max_rel_error <= tolerance(r.dtype), (r.name, r.max_rel_error)


def test_json_and_table_rendering(quick_rows):
    data = json.loads(render_bench(quick_rows, "json"))
    assert isinstance(data, list) and len(data) == len(quick_rows)
    for obj, row in zip(data, quick_rows, strict=True):
        assert all(key in obj for key in REQUIRED)
        assert obj["fraction_of_peak"] == pytest.approx(obj["gops"] / obj["peak_gops"])
        assert obj["name"] == row.name and obj["assumption"]
    table = render_bench(quick_rows, "table")
    assert all(r.name in table for r in quick_rows) and "GHz" in table
    with pytest.raises(ValueError, match="valid formats"):
        render_bench(quick_rows, "csv")


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_eager_paths_match_fp32_on_small_shapes(path, small):
    weight, x = small
    case = build_case(path, weight, x)
    assert case_error(case, x) <= tolerance(case.dtype)


def test_error_check_catches_a_wrong_path(small):
    weight, x = small
    wrong = Case(lambda a: F.linear(a, weight * 1.5), x, lambda y: y, weight)
    assert case_error(wrong, x) > tolerance("int8")


@pytest.mark.parametrize("path,block", [("sparse_csr", None), ("sparse_bsr", 16),
                                        ("sparse_bsr", 32)])
def test_sparse_equals_dense_on_the_same_weights(path, block):
    gen = torch.Generator().manual_seed(2)
    weight, x = torch.randn(64, 96, generator=gen), torch.randn(8, 96, generator=gen)
    sparse = _masked(weight, 0.75, block, gen)
    assert 0 < (sparse == 0).float().mean() < 1
    case = build_case(path, sparse, x, block=block)
    with torch.no_grad():
        out = case.to_float(case.fn(case.arg))
    torch.testing.assert_close(out, F.linear(x, sparse), rtol=1e-5, atol=1e-5)


def test_lowrank_at_full_rank_equals_dense(small):
    weight, x = small
    full = build_case(LOWRANK_PATH, weight, x, rank=min(weight.shape))
    with torch.no_grad():
        torch.testing.assert_close(full.fn(x), F.linear(x, weight), rtol=1e-4, atol=1e-4)
        truncated = build_case(LOWRANK_PATH, weight, x, rank=4)
        assert (truncated.fn(x) - F.linear(x, weight)).abs().max() > 1e-2


def test_isa_for_maps_onednn_implementations():
    flags = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"})
    target = Target("cpu-x86", "test", 2, flags)
    assert _isa_for("int8", "matmul:brg_matmul:avx10_1_512_amx", target) == "amx_int8"
    assert _isa_for("bf16", "matmul:brg_matmul:avx10_1_512_amx", target) == "amx_bf16"
    assert _isa_for("int8", "matmul:brg_matmul:avx512_core_vnni", target) == "avx512_vnni"
    assert _isa_for("bf16", "matmul:brg_matmul:avx512_core_bf16", target) == "avx512_bf16"
    assert _isa_for("fp32", "", target) == "avx512"
    assert _isa_for("fp32", "inner_product:brg_matmul:avx2", target) == "avx2"
    assert _isa_for("int8", "", target) == "avx512_vnni"
    assert _isa_for("fp32", "", Target("cpu-x86", "test", 2, frozenset())) == "avx2"


def test_measured_peak_is_positive_and_consistent():
    peak = measure_peak()
    assert math.isfinite(peak.clock_ghz) and peak.clock_ghz > 0 and peak.clock_source
    assert all(math.isfinite(v) and v > 0 for v in peak.probe_gops.values())
    assert peak.per_core_gops("avx512_vnni") == pytest.approx(4 * peak.per_core_gops("avx512"))


def test_invalid_arguments_raise(small):
    weight, x = small
    with pytest.raises(ValueError, match="'threads' parameter"):
        run_kernel_bench(threads=0)
    with pytest.raises(ValueError, match="valid paths"):
        build_case("fp64_magic", weight, x)
    with pytest.raises(ValueError, match="'rank' parameter"):
        build_case(LOWRANK_PATH, weight, x, rank=0)
    with pytest.raises(ValueError, match="'block' parameter"):
        build_case("sparse_bsr", weight, x)


def test_importing_the_bench_does_not_import_torchao():
    code = "import sys, paretoslim.kernels._bench\nprint('torchao' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_break_even_interpolates_the_crossing():
    def row(sparsity, speedup):
        return BenchRow("sparse_csr", "sparse", 8, 8, 8, 1, "fp32", 1.0, 2.0, 0.5, speedup,
                        "avx512", "k", 1.0, 1, 0.0, "dense-equivalent", sparsity=sparsity)

    found = break_even([row(0.5, 0.5), row(0.9, 2.0), row(0.99, 8.0)])
    assert found["sparse_csr 8x8x8"] == pytest.approx(0.7)
    assert isinstance(break_even([row(0.5, 2.0), row(0.9, 3.0)])["sparse_csr 8x8x8"], str)
