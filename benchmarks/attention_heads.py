"""Whole attention heads removed from a patch transformer on Fashion-MNIST: quality,
speedup (lowered and timed like a study trial) and compression against the teacher."""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _rows import record, trial_settings
from torch import nn
from tqdm.auto import tqdm

from paretoslim.evaluators import cache_dir, run_isolated
from paretoslim.search import Task, measure_baseline, run_trial
from paretoslim.search._measuring import latency_job, quality_of
from paretoslim.spaces import Recipe, prune_heads
from paretoslim.studies._data import TensorBatches
from paretoslim.studies.fashion_mnist import load_fashion_mnist, normalize

RECIPES: dict[str, dict] = {
    "heads 0.25 (L2, global)": {"pruning": {"heads": 0.25}},
    "heads 0.5 (L2, global)": {"pruning": {"heads": 0.5}},
    "heads 0.5 (L2, uniform)": {"pruning": {"heads": 0.5, "allocation": "uniform"}},
    "heads 0.5 (Taylor, global)": {"pruning": {"heads": 0.5, "criterion": "taylor"}},
    "heads 0.75 (L2, global)": {"pruning": {"heads": 0.75}},
    "channels 0.5 (L2, global)": {"pruning": {"ratio": 0.5}},
    "heads 0.5 + channels 0.3": {"pruning": {"heads": 0.5, "ratio": 0.3}},
    "int8 static": {"quantization": {"scheme": "int8_static"}},
    "heads 0.5 + int8 static": {"pruning": {"heads": 0.5},
                                "quantization": {"scheme": "int8_static"}},
    "heads 0.5 + channels 0.3 + int8 static": {"pruning": {"heads": 0.5, "ratio": 0.3},
                                               "quantization": {"scheme": "int8_static"}},
}


class PatchTransformer(nn.Module):
    """7x7 patches of a 28x28 image as 16 tokens, a pre-norm encoder, mean pooling."""

    def __init__(self, dim: int = 128, heads: int = 8, layers: int = 4, hidden: int = 256,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(49, dim)
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(x.shape[0], 16, 49)
        return self.head(self.norm(self.encoder(self.embed(tokens) + self.position).mean(1)))


def teacher(train: TensorBatches, epochs: int) -> PatchTransformer:
    """Trained once (AdamW, one cycle), cached under the paretoslim cache directory."""
    path = cache_dir() / "benchmarks" / f"fashion_mnist_patch_transformer_e{epochs}.pt"
    model = PatchTransformer()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3,
                                                    total_steps=epochs * len(train))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        for inputs, targets in tqdm(train, desc=f"teacher epoch {epoch + 1}/{epochs}"):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000, help="fine-tune steps per recipe")
    parser.add_argument("--epochs", type=int, default=6, help="teacher training epochs")
    parser.add_argument("--only", nargs="*", help="substrings of recipe names to run")
    parser.add_argument("--min-calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("attention_heads.jsonl"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = load_fashion_mnist()
    train_x, test_x = normalize(data.train_images), normalize(data.test_images)
    train_y, test_y = torch.from_numpy(data.train_labels), torch.from_numpy(data.test_labels)
    model = teacher(TensorBatches(train_x, train_y, 128, shuffle=True, seed=0), args.epochs)
    torch.set_num_threads(1)
    task = Task(model=model, train=TensorBatches(train_x, train_y, 64, shuffle=True, seed=0),
                val=TensorBatches(test_x, test_y, 500), example_input=test_x[:64].clone(),
                name="fashion_mnist_patch_transformer")
    baseline = measure_baseline(task)
    settings = trial_settings(args.steps, args.min_calls)
    print(f"teacher: quality {baseline.quality:.4f}, size {baseline.size_mb:.3f} MB, "
          f"{baseline.parameters} parameters, 4 x 8 heads", flush=True)
    print("| recipe | heads kept | quality | drop (pt) | speedup (spread) | compression |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    rows = {"unfused attention, all heads (control)": None}
    rows.update({n: r for n, r in RECIPES.items()
                 if not args.only or any(s in n for s in args.only)})
    with args.out.open("a") as log:
        for name, data in rows.items():
            started = time.perf_counter()
            if data is None:  # the representation alone, no head removed, no fine-tune
                control = copy.deepcopy(task.model)
                prune_heads(control, 0.0, global_ranking=True)
                job = latency_job(task, control, "fp32", settings.latency, baseline)
                report = run_isolated(job)
                quality = quality_of(task, control)
                metrics = {**report.metrics(), "quality": quality, "compression": 1.0,
                           "quality_drop": baseline.quality - quality}
                failure = None
            else:
                result = run_trial(task, Recipe.from_dict(data), settings, baseline)
                metrics, failure = result.metrics, result.failure
            if not record(log, name, data, failure, time.perf_counter() - started, metrics,
                          columns=6):
                continue
            kept = 32 - metrics.get("heads_removed", 0)
            print(f"| {name} | {kept}/32 | {metrics['quality']:.4f} | "
                  f"{100 * metrics['quality_drop']:+.2f} | {metrics['speedup']:.2f}x "
                  f"({100 * metrics['speedup_spread']:.1f}%) | "
                  f"{metrics['compression']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
