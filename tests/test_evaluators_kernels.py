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
    assert size_mb(model) == serialized_size_bytes(model) / 1e6


def test_time_interleaved_reports_every_callable():
    model = TinyMLP().eval()
    stats = time_interleaved({"a": model, "b": model}, torch.randn(4, 16), min_calls=40,
                             min_seconds=0.0, block=10)
    for s in stats.values():
        assert s.calls >= 40 and s.median_ms > 0 and s.iqr_ms >= 0 and s.cov >= 0


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


def test_aoti_lowering_never_leaks_an_input_mutation():
    x = torch.randn(4, 3)
    try:
        lowered = lower(InputMutating(), x, "fp32", "aoti")
    except LoweringError as exc:
        assert "modified its input" in str(exc)
    else:  # a functional program: outputs must still equal eager on a fresh copy
        assert torch.allclose(lowered.fn(x.clone()), (2 * x).sum(dim=1, keepdim=True))


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


def test_an_unstable_ratio_is_measured_again_and_marked_noisy():
    import time

    from paretoslim.evaluators import measure_speedup

    calls = {"n": 0}

    def jittery(x):
        calls["n"] += 1
        # alternate slow and fast blocks of 20 calls: the ratio swings by 3x between rounds
        time.sleep(0.0003 if (calls["n"] // 20) % 2 else 0.0009)

    def steady(x):
        time.sleep(0.0003)

    result = measure_speedup(jittery, steady, torch.zeros(1), min_calls=80, min_seconds=0.0,
                             max_spread=0.05, attempts=2)
    assert result.attempts == 2 and result.noisy
    assert result.speedup_spread > 0.05


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
