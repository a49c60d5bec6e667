import pytest
import torch
from _tiny import InputMutating, TinyMLP
from torch import nn

from paretoslim.evaluators import (
    accuracy,
    serialized_size_bytes,
    size_mb,
    time_interleaved,
    torch_threads,
)
from paretoslim.kernels import LoweringError, detect_target, lower, relative_error


def test_accuracy_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    batches = [(torch.eye(3), torch.tensor([0, 1, 1])), (torch.eye(3)[:1], torch.tensor([0]))]
    assert accuracy(Fixed(), batches) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="no samples"):
        accuracy(Fixed(), [])


def test_size_counts_tied_weights_once():
    model = TinyMLP()
    base = serialized_size_bytes(model)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert weights < base < weights + 4096
    model.extra = nn.Linear(64, 64)
    model.extra.weight = model.net[2].weight  # tied, not new
    assert serialized_size_bytes(model) < base + 64 * 4 + 1024
    # a million fp32 weights are 4 MB, whatever the serialization adds
    assert size_mb(nn.Linear(1000, 1000, bias=False)) == pytest.approx(4.0, rel=0.01)


def test_time_interleaved_reports_every_callable():
    model = TinyMLP().eval()
    stats = time_interleaved({"a": model, "b": model}, torch.randn(4, 16), min_calls=40,
                             min_seconds=0.0, block=10)
    assert set(stats) == {"a", "b"}
    for s in stats.values():
        assert s.calls >= 40 and s.median_ms > 0 and s.iqr_ms >= 0 and s.cov >= 0


class ScriptedClock:
    """A clock that moves only when a timed callable says how long it ran."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms * 1e-3


@pytest.fixture
def clock(monkeypatch):
    from paretoslim.evaluators import _latency

    scripted = ScriptedClock()
    monkeypatch.setattr(_latency, "_clock", scripted)
    return scripted


def test_time_interleaved_alternates_blocks_and_times_each_callable(clock):
    order = []

    def timed(name, ms):
        def fn(x):
            order.append(name)
            clock.spend(ms)
        return fn

    medians = {}
    stats = time_interleaved({"a": timed("a", 1.0), "b": timed("b", 3.0)}, torch.zeros(1),
                             warmup=2, block=10, min_calls=40, min_seconds=0.0,
                             block_medians=medians)
    assert set(stats) == {"a", "b"} and stats["a"].calls == stats["b"].calls == 40
    assert stats["a"].median_ms == pytest.approx(1.0) and stats["b"].median_ms == pytest.approx(
        3.0)
    assert stats["a"].iqr_ms == pytest.approx(0.0) and stats["b"].cov == pytest.approx(0.0)
    assert order == ["a"] * 2 + ["b"] * 2 + (["a"] * 10 + ["b"] * 10) * 4
    assert medians == {"a": [pytest.approx(1e-3)] * 4, "b": [pytest.approx(3e-3)] * 4}  # s


def test_torch_threads_restores_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("backend", ["aoti", "compile"])
def test_lowered_fp32_matches_eager(backend):
    torch._dynamo.reset()
    model, x = TinyMLP().eval(), torch.randn(8, 16)
    lowered = lower(model, x, "fp32", backend)
    assert lowered.backend == backend
    with torch.no_grad():
        torch.testing.assert_close(lowered.fn(x), model(x), rtol=1e-4, atol=1e-5)
    assert lowered.max_relative_error <= 1e-3 and lowered.compile_seconds > 0


def test_lowering_rejects_a_model_that_mutates_its_input():
    torch._dynamo.reset()
    with pytest.raises(LoweringError, match="modified its input"):
        lower(InputMutating(), torch.randn(4, 3), "fp32", "compile")


def test_aoti_lowering_detects_an_input_mutation():
    # torch.export keeps the in-place mul_ as an input mutation, and the AOTInductor package
    # applies it to the tensor it is given: lower() sees its probe changed and refuses.
    torch._dynamo.reset()
    x = torch.randn(4, 3)
    before = x.clone()
    with pytest.raises(LoweringError, match="modified its input in place"):
        lower(InputMutating(), x, "fp32", "aoti")
    assert torch.equal(x, before)  # lower() only ever runs copies of the caller's input


def test_relative_error():
    assert relative_error(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) == pytest.approx(
        0.05)


def test_detect_target():
    target = detect_target("cpu-x86")
    assert target.cores >= 1 and set(target.capabilities) == {"avx512", "vnni", "bf16", "amx"}
    with pytest.raises(ValueError, match="Unknown target"):
        detect_target("tpu-v9")


def test_measure_speedup_of_a_model_against_itself_is_about_one():
    from paretoslim.evaluators import measure_speedup

    model = TinyMLP().eval()
    result = measure_speedup(model, model, torch.randn(4, 16), min_calls=60, min_seconds=0.0,
                             max_spread=10.0)
    assert 0.5 < result.speedup < 2.0
    assert result.attempts == 1 and not result.noisy
    assert result.model.calls >= 60 and result.baseline.calls >= 60


def _flip(fast: float, slow: float):
    return lambda r: fast if r % 2 else slow


def _scripted_pair(clock, model_ms):
    """A model taking ``model_ms(r)`` ms in round r (blocks of 20 calls) against a 1 ms
    baseline, on the scripted clock; ``restart()`` starts the rounds again."""
    baseline_calls = [0]

    def model(x):
        clock.spend(model_ms(baseline_calls[0] // 20))

    def baseline(x):
        baseline_calls[0] += 1
        clock.spend(1.0)

    model.restart = lambda: baseline_calls.__setitem__(0, 0)
    return model, baseline


# A model whose per-call time (ms) depends on the measuring round r against a 1 ms baseline.
# With 80 calls in blocks of 20, attempt one is rounds 0-3 and attempt two rounds 5-8.
@pytest.mark.parametrize("model_ms,attempts,noisy,spread", [
    (lambda r: 0.5, 1, False, (0.0, 0.0)),  # steady: measured once
    (_flip(0.5, 1.5), 2, True, (0.5, 1.5)),  # ratio swings 3x every round: noisy twice
    (lambda r: _flip(0.5, 1.5)(r) if r < 4 else 0.5, 2, False, (0.0, 0.0)),  # settles
    (lambda r: _flip(0.9, 1.1)(r) if r < 4 else _flip(0.5, 1.5)(r), 2, True,
     (0.1, 0.3)),  # both noisy: the steadier first attempt is kept
])
def test_an_unstable_ratio_is_measured_again_and_marked_noisy(clock, model_ms, attempts, noisy,
                                                               spread):
    from paretoslim.evaluators import measure_speedup

    model, baseline = _scripted_pair(clock, model_ms)
    result = measure_speedup(model, baseline, torch.zeros(1), min_calls=80, min_seconds=0.0,
                             max_spread=0.05, attempts=2)
    assert result.attempts == attempts and result.noisy == noisy
    assert spread[0] <= result.speedup_spread <= spread[1]
    assert result.model.calls == result.baseline.calls == 80
    if not noisy:
        assert result.speedup == pytest.approx(2.0)


@pytest.mark.parametrize("model_ms,calls", [
    (lambda r: 0.5, (100, 100)),  # a steady ratio: known after 5 rounds of 20 calls
    (_flip(0.49, 0.51), (200, 300)),  # a 4% spread: after (4/5)^2 of the 20 rounds
    (_flip(0.488, 0.512), (400, 400)),  # a 4.9% spread: only after every round
])
def test_a_steady_ratio_ends_its_timing_early(clock, model_ms, calls):
    from paretoslim.evaluators import measure_speedup

    model, baseline = _scripted_pair(clock, model_ms)
    result = measure_speedup(model, baseline, torch.zeros(1), min_calls=400, min_seconds=0.0,
                             max_spread=0.05)
    assert result.model.calls == result.baseline.calls and result.attempts == 1
    assert calls[0] <= result.model.calls <= calls[1]
    model.restart()
    full = measure_speedup(model, baseline, torch.zeros(1), min_calls=400, min_seconds=0.0,
                           max_spread=0.05, stop_when_steady=False)
    assert full.model.calls == 400


def test_the_rounds_a_timing_needs_count_calls_and_seconds():
    from paretoslim.evaluators._latency import _rounds_needed, steady_enough

    samples, spent = {"a": [1e-3] * 40, "b": [1e-2] * 40}, {"a": 0.04, "b": 0.4}
    assert _rounds_needed(samples, spent, 20, 300, 0.0) == 15
    assert _rounds_needed(samples, spent, 20, 300, 1.0) == 50  # a: 1000 calls for 1 s
    steady = {"model": [1.0] * 5, "baseline": [2.0] * 5}
    assert steady_enough(steady, 15, max_spread=0.05)
    swinging = {"model": [1.0, 1.1] * 4, "baseline": [2.0] * 8}  # ratios 2 and 1.82: 9%
    assert not steady_enough(swinging, 8, max_spread=0.05)
    assert steady_enough(swinging, 8, max_spread=0.1)


def test_work_in_a_compute_share_waits_for_a_timing_and_a_timing_for_it(tmp_path,
                                                                         monkeypatch):
    import threading
    import time

    from paretoslim.evaluators import ComputeShare, measurement_lock

    monkeypatch.setenv("PARETOSLIM_LOCK_DIR", str(tmp_path))
    log, share = [], ComputeShare()
    share.pause_point()  # a fine-tune step under way

    def timing():
        with measurement_lock():
            log.append("timing")
            time.sleep(0.3)
            log.append("timed")

    timer = threading.Thread(target=timing)
    timer.start()
    time.sleep(0.3)
    log.append("step done")
    share.pause_point()  # the timing goes first, then the next step
    log.append("next step")
    share.release()
    timer.join(timeout=10)
    assert log == ["step done", "timing", "timed", "next step"]


def test_importing_the_kernels_does_not_import_the_evaluators():
    import subprocess
    import sys

    code = ("import sys, paretoslim.kernels\n"
            "print(sorted(m for m in sys.modules if m.startswith('paretoslim.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    loaded = result.stdout.strip()
    assert "paretoslim.kernels" in loaded and "paretoslim.evaluators" not in loaded
    assert "paretoslim.search" not in loaded


def test_measurements_of_two_processes_do_not_overlap(tmp_path, monkeypatch):
    import subprocess
    import sys

    from paretoslim.evaluators import measurement_lock

    monkeypatch.setenv("PARETOSLIM_LOCK_DIR", str(tmp_path))
    log = tmp_path / "log.txt"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib\n"
        "from paretoslim.evaluators import measurement_lock\n"
        f"log = pathlib.Path({str(log)!r})\n"
        "with measurement_lock():\n"
        "    log.write_text('held\\n')\n"
        "    time.sleep(1.5)\n"
        "    log.write_text(log.read_text() + 'released\\n')\n")])
    try:
        import time

        deadline = time.monotonic() + 20
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with measurement_lock():
            lines = log.read_text().split()
        assert lines == ["held", "released"]
    finally:
        holder.wait(timeout=20)
