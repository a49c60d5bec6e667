import pytest
import torch
from _tiny import TinyMLP
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


def test_lowered_fp32_matches_eager():
    torch._dynamo.reset()
    model, x = TinyMLP().eval(), torch.randn(8, 16)
    lowered = lower(model, x, "fp32")
    with torch.no_grad():
        torch.testing.assert_close(lowered.fn(x), model(x), rtol=1e-4, atol=1e-5)
    assert lowered.max_relative_error <= 1e-3 and lowered.compile_seconds > 0


def test_lowering_rejects_a_model_that_mutates_its_input():
    class Mutating(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x.sum(dim=1, keepdim=True)

    torch._dynamo.reset()
    with pytest.raises(LoweringError, match="modified its input"):
        lower(Mutating(), torch.randn(4, 3), "fp32")


def test_relative_error():
    assert relative_error(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) == pytest.approx(
        0.05)


def test_detect_target():
    target = detect_target("cpu-x86")
    assert target.cores >= 1 and set(target.capabilities) == {"avx512", "vnni", "bf16", "amx"}
    with pytest.raises(ValueError, match="Unknown target"):
        detect_target("tpu-v9")
