import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from paretoslim.evaluators import _ceiling, _peak
from paretoslim.evaluators._bench import (
    BenchRow,
    _masked,
    break_even,
    render_bench,
    run_kernel_bench,
)
from paretoslim.evaluators._ceiling import (
    OPS_PER_CYCLE,
    Ceiling,
    Microarch,
    build_ceiling,
    measure_ceiling,
    microarchitecture,
)
from paretoslim.evaluators._gemm import (
    GEMM_PATHS,
    LOWRANK_PATH,
    Case,
    _isa_for,
    build_case,
    case_error,
    tolerance,
)
from paretoslim.kernels import Target, detect_target

REQUIRED = ("name", "threads", "gops", "peak_gops", "fraction_of_peak", "speedup_vs_fp32",
            "peak_source")
EAGER_PATHS = [p for p in GEMM_PATHS if "inductor" not in p and p not in
               ("int8_static_pt2e", "int8_dynamic_torchao")]


def cpuinfo(vendor: str, family: int, model: int, flags: str) -> str:
    """A two-processor /proc/cpuinfo text; only the first block may be read."""
    block = (f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
             f"model\t\t: {model}\nmodel name\t: test cpu\ncpu MHz\t\t: 2600.000\n"
             f"flags\t\t: {flags}\n")
    return block.format(n=0) + "\n" + block.format(n=1).replace(vendor, "OtherVendor")


AVX512 = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16"
ZEN4 = cpuinfo("AuthenticAMD", 25, 17, AVX512)
ZEN5 = cpuinfo("AuthenticAMD", 26, 2, AVX512)
XEON_AMX = cpuinfo("GenuineIntel", 6, 143, AVX512 + " amx_tile amx_int8 amx_bf16")


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
        assert r.threads == 1 and r.isa in OPS_PER_CYCLE[r.microarchitecture] and r.kernel
        assert math.isfinite(r.gops) and r.gops > 0 and r.peak_gops > 0 and r.calls > 0
        assert r.fraction_of_peak == pytest.approx(r.executed_gops / r.peak_gops)
        flops = 2 * r.m * r.rank * (r.k + r.n) if r.rank else 2 * r.m * r.k * r.n
        assert r.gops == pytest.approx(flops / (r.median_ms * 1e-3) / 1e9)
        assert r.speedup_vs_fp32 is not None and r.speedup_vs_fp32 > 0
        if r.name == "fp32_eager":
            assert r.speedup_vs_fp32 == 1.0
    for r in quick_rows:
        if r.name.startswith("sparse"):
            assert r.group == "sparse" and r.flop_basis == "dense-equivalent"
            assert 0 < r.sparsity < 1 and (r.block in (16, 32)) == r.name.startswith("sparse_bsr")
            assert r.executed_gops < r.gops  # only the nonzeros are executed
        else:
            assert r.executed_gops == r.gops
        if r.name == LOWRANK_PATH:
            assert r.group == "lowrank" and 1 <= r.rank <= min(r.k, r.n)


def test_no_path_runs_above_the_ceiling_of_its_isa(quick_rows):
    for r in quick_rows:
        assert r.fraction_of_peak <= 1.05, (r.name, r.fraction_of_peak, r.peak_gops)


def test_every_probed_isa_is_judged_against_its_measured_ceiling(quick_rows):
    ceiling = measure_ceiling()
    for r in quick_rows:
        if r.isa in ceiling.probe_gops:
            assert r.peak_source == "measured" and "measured" in r.assumption
            assert r.peak_gops == pytest.approx(ceiling.probe_gops[r.isa])
        else:
            assert r.peak_source == f"table:{ceiling.uarch.name}"
        assert r.microarchitecture == ceiling.uarch.name


@pytest.mark.parametrize("text,name", [
    (ZEN4, "zen4"),
    (ZEN5, "zen5"),
    (XEON_AMX, "xeon_amx"),
    (cpuinfo("AuthenticAMD", 25, 33, "avx2 fma"), "generic"),  # Zen 3: same family, no AVX-512
    (cpuinfo("GenuineIntel", 6, 106, AVX512), "generic"),  # Ice Lake: no AMX
    ("", "generic"),
])
def test_microarchitecture_is_read_from_the_first_processor(text, name):
    uarch = microarchitecture(text)
    assert uarch.name == name
    if text:
        assert "family 0x" in uarch.basis and "OtherVendor" not in uarch.basis


def test_the_table_holds_the_documented_ratios():
    zen4, zen5, xeon = (OPS_PER_CYCLE[u] for u in ("zen4", "zen5", "xeon_amx"))
    for isa in ("avx512", "avx512_bf16", "avx512_vnni"):  # 512-bit ops double-pumped
        assert 2 * zen4[isa] == zen5[isa], isa
    assert zen4["avx2"] == zen5["avx2"] == zen4["avx512"]  # 256-bit ops are not split
    assert "amx_int8" not in zen4 and "amx_int8" not in zen5
    assert xeon["amx_int8"] == 8 * xeon["avx512_vnni"] and xeon["amx_bf16"] == 8 * xeon[
        "avx512_bf16"]
    # Measured figures (per core): Zen 5 at 3.7 GHz fp32 237, bf16 474, int8 947 GOP/s;
    # Zen 4 ceilings 117 / 226 / 456, one fp32 FMA zmm per cycle at ~3.65 GHz.
    for isa, measured in (("avx512", 237), ("avx512_bf16", 474), ("avx512_vnni", 947)):
        assert zen5[isa] * 3.7 == pytest.approx(measured, rel=0.03), isa
    clock = 117 / zen4["avx512"]
    for isa, measured in (("avx512_bf16", 226), ("avx512_vnni", 456)):
        assert zen4[isa] * clock == pytest.approx(measured, rel=0.06), isa


def test_a_ceiling_without_the_probe_uses_the_table_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(_ceiling, "_MAX_FREQ", tmp_path / "absent")  # as in a VM: no cpufreq
    rates = _peak.Rates(None, {}, dict.fromkeys(_peak.PROBES, "executable memory refused"))
    ceiling = build_ceiling(rates, ZEN4)
    assert ceiling.clock_ghz == pytest.approx(2.6) and "cpu MHz" in ceiling.clock_source
    gops, source = ceiling.per_core("avx512_vnni")
    assert source == "table:zen4" and gops == pytest.approx(2.6 * 128)
    note = ceiling.describe("avx512_vnni", 2)
    assert "2 core(s)" in note and "double-pumped" in note and "executable memory" in note
    with pytest.raises(ValueError, match="No ceiling for ISA 'amx_int8' on zen4"):
        ceiling.per_core("amx_int8")
    (tmp_path / "cpuinfo_max_freq").write_text("3700000\n")  # kHz
    monkeypatch.setattr(_ceiling, "_MAX_FREQ", tmp_path / "cpuinfo_max_freq")
    zen5 = build_ceiling(rates, ZEN5)
    assert zen5.per_core("avx512") == (pytest.approx(3.7 * 64), "table:zen5")
    assert "cpuinfo_max_freq" in zen5.clock_source
    measured = Ceiling("c", 2, Microarch("zen4", "b"), 3.0, "s", {"avx512_vnni": 400.0})
    assert measured.per_core("avx512_vnni") == (400.0, "measured")


@pytest.mark.slow  # a rate of this core: true only with nothing else running beside it
@pytest.mark.parametrize("isa", list(_peak.PROBES))
def test_probe_rate_per_cycle_matches_the_table_on_this_cpu(isa):
    ceiling = measure_ceiling()
    if isa not in ceiling.probe_gops:
        pytest.skip(f"{isa}: {ceiling.probe_missing.get(isa)}")
    if ceiling.uarch.name == "generic":
        pytest.skip("no documented table for this microarchitecture")
    per_cycle = ceiling.probe_gops[isa] / ceiling.clock_ghz
    assert 0.8 <= per_cycle / OPS_PER_CYCLE[ceiling.uarch.name][isa] <= 1.2, per_cycle


def test_probe_loops_encode_what_the_assembler_reads():
    # Expected bytes as GNU objdump disassembles them.
    assert _peak._vex3(13, 14, 15, 1, 2, 0xB8, True).hex() == "c4420db8ef"  # vfmadd231ps ymm
    assert _peak._vex3(8, 8, 8, 1, 1, 0xEF, True).hex() == "c4413defc0"  # vpxor ymm8
    avx2 = _peak.PROBES["avx2"].code
    assert avx2[0x50:0x55].hex() == "c4c20db8c7" and avx2[-9:].hex() == "48ffcf75b5c5f877c3"
    assert _peak._ADD_CHAIN[-10:].hex() == "48ffcf0f85cbfeffffc3"  # dec rdi; jne -309; ret
    vnni = _peak.PROBES["avx512_vnni"].code
    assert vnni[0x84:0x8A].hex() == "62920d4050e7"  # vpdpbusd zmm4, zmm30, zmm31
    amx = _peak.PROBES["amx_int8"].code
    assert amx[0x23:0x28].hex() == "c4e2535ec4" and amx[0x3A:0x3C].hex() == "75e7"  # tdpbssd


def test_the_probe_fails_soft_where_executable_memory_is_refused(monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_peak.mmap, "mmap", refuse)
    rates = _peak.measure_rates(detect_target().flags)
    assert rates.clock_ghz is None and not rates.gops
    assert set(rates.missing) == set(_peak.PROBES)
    assert all("executable memory refused" in why for why in rates.missing.values())
    ceiling = measure_ceiling.__wrapped__()  # uncached: probes again, refused again
    assert not ceiling.probe_gops and ceiling.per_core("avx512")[1].startswith("table:")


def test_the_probe_fails_soft_off_x86_and_without_amx_permission(monkeypatch):
    monkeypatch.setattr(_peak, "_amx_permitted", lambda: False)
    amx = _peak.measure_rates({"amx_tile", "amx_int8", "amx_bf16"})  # runs no AMX code
    assert amx.clock_ghz and not amx.gops
    assert "refused the AMX tile state" in amx.missing["amx_int8"]
    assert "no avx512f" in amx.missing["avx512"]
    monkeypatch.setattr(_peak.platform, "machine", lambda: "aarch64")
    arm = _peak.measure_rates({"avx512f"})
    assert arm.clock_ghz is None and "aarch64" in arm.missing["avx512"]


def test_every_benchmarked_path_matches_fp32(quick_rows):
    for r in quick_rows:
        assert r.max_rel_error <= tolerance(r.dtype), (r.name, r.max_rel_error)


def test_json_and_table_rendering(quick_rows):
    data = json.loads(render_bench(quick_rows, "json"))
    assert isinstance(data, list) and len(data) == len(quick_rows)
    for obj, row in zip(data, quick_rows, strict=True):
        assert all(key in obj for key in REQUIRED)
        assert obj["fraction_of_peak"] == pytest.approx(obj["executed_gops"] / obj["peak_gops"])
        assert obj["name"] == row.name and obj["assumption"]
    table = render_bench(quick_rows, "table")
    assert all(r.name in table for r in quick_rows) and "GHz" in table
    for row in quick_rows:  # every ISA's ceiling is stated with its source
        assert f"{row.isa}: {row.peak_source}; {row.assumption}" in table
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
    code = "import sys, paretoslim.evaluators._bench\nprint('torchao' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_break_even_interpolates_the_crossing():
    def row(sparsity, speedup):
        return BenchRow(
            name="sparse_csr", group="sparse", m=8, k=8, n=8, threads=1, dtype="fp32",
            gops=1.0, executed_gops=0.5, peak_gops=2.0, fraction_of_peak=0.25,
            peak_source="measured", speedup_vs_fp32=speedup, isa="avx512", kernel="k",
            median_ms=1.0, calls=1, max_rel_error=0.0, flop_basis="dense-equivalent",
            sparsity=sparsity)

    found = break_even([row(0.5, 0.5), row(0.9, 2.0), row(0.99, 8.0)])
    assert found["sparse_csr 8x8x8"] == pytest.approx(0.7)
    assert isinstance(break_even([row(0.5, 2.0), row(0.9, 3.0)])["sparse_csr 8x8x8"], str)
