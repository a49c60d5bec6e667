"""Tiny models and tasks for the tests: each runs in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from paretoslim.search import Task


class TinyCNN(nn.Module):
    """Conv-BN-ReLU blocks with a residual add, pooling and a classifier."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1),
                                   nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1),
                                   nn.BatchNorm2d(width))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 4 * 4, 32), nn.ReLU(),
                                  nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.pool(x))


class TinyMLP(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DepthwiseBlock(nn.Module):
    """Residual block: depthwise 3x3, BatchNorm, ReLU, pointwise 1x1, BatchNorm, plus input."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels,
                                   bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.depthwise(x)))
        return torch.relu(x + self.bn2(self.pointwise(y)))


class TinyResNet(nn.Module):
    """Stem, three repeated depthwise residual blocks, a channel concatenation, a head."""

    def __init__(self, width: int = 16, classes: int = 4, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[DepthwiseBlock(width) for _ in range(blocks)])
        self.side = nn.Conv2d(width, width // 2, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width + width // 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.cat([x, self.side(x)], dim=1))


class TinyTransformer(nn.Module):
    """Patch projection, a two-layer encoder (multi-head attention, LayerNorm, GELU),
    mean pooling and a classifier; input N x tokens x features."""

    def __init__(self, features: int = 8, dim: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(x)).mean(dim=1)))


class InputMutating(nn.Module):
    """Doubles its input in place, then sums rows: a lowering must not leak the mutation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x.sum(dim=1, keepdim=True)


def blobs(n: int, shape: tuple[int, ...], classes: int, seed: int):
    """Separable synthetic classification data: class-dependent means plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(99))
    x = centers[y] + 0.8 * torch.randn(n, *shape, generator=g)
    return x, y


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def train_briefly(model: nn.Module, data, epochs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def tiny_task(kind: str = "cnn") -> Task:
    """A trained tiny model with its data, as a user's task factory would build it."""
    torch.manual_seed(0)
    if kind == "cnn":
        shape, model = (1, 8, 8), TinyCNN()
    elif kind == "resnet":
        shape, model = (1, 8, 8), TinyResNet()
    elif kind == "transformer":
        shape, model = (6, 8), TinyTransformer()
    elif kind == "mlp":
        shape, model = (16,), TinyMLP()
    else:
        raise ValueError(f"unknown tiny task kind {kind!r}")
    x, y = blobs(512, shape, 4, seed=1)
    vx, vy = blobs(256, shape, 4, seed=2)
    train = batches(x, y, 32)
    train_briefly(model, train)
    return Task(model=model, train=train, val=batches(vx, vy, 64), example_input=vx[:16],
                name=f"tiny_{kind}")


TASK_FILE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _tiny import TinyMLP, tiny_task

def make_task(broken_student=False):
    task = tiny_task("mlp")
    if broken_student:
        def student(width, depth):
            if width == 0.5:
                raise RuntimeError("this student family has no narrow members")
            return TinyMLP()
        task.student = student
    return task
"""

SPEC = """
task = "task.py:make_task"
name = "tiny"
trials = {trials}
seed = 0
seeds = []
[stopping]
enabled = false
[sampler]
name = "random"
[finetune]
steps = 5
[latency]
min_calls = 20
min_seconds = 0.0
lowering = "compile"  # half the compile time of AOTInductor: these studies test the search
[space.student]
width = {width}
[space.pruning]
ratio = {{ low = 0.0, high = 0.5, step = 0.25 }}
[space.quantization]
scheme = ["fp32", "int8_static"]
"""


def write_study(tmp_path, trials=2, width="[0.5, 1.0]", broken=False):
    """A user task file and a spec for a tiny study in ``tmp_path``; returns the spec path."""
    (tmp_path / "task.py").write_text(TASK_FILE)
    spec_text = SPEC.format(trials=trials, width=width)
    if broken:
        spec_text += "[task_options]\nbroken_student = true\n"
    (tmp_path / "study.toml").write_text(spec_text)
    return tmp_path / "study.toml"


def recorded_trial(study, *, recipe=None, metrics=None, values=None, state=None,
                   constraint=None, **fields):
    """Ask ``study`` for a trial, write its record (``fields``: other TrialRecord fields,
    e.g. ``failure``, ``stopped``, ``duplicate_of``), set its quality ``constraint`` and, with
    ``state`` (a TrialState) or ``values``, tell it; return the trial."""
    from optuna.trial import TrialState

    from paretoslim.search._record import TrialRecord
    from paretoslim.search._store import StudyStore

    trial = study.ask()
    StudyStore.write(trial, TrialRecord(recipe=recipe or {}, metrics=metrics or {},
                                        values=None if values is None else tuple(values),
                                        **fields))
    if constraint is not None:
        trial.set_constraint("max_quality_drop", constraint)
    if state is not None or values is not None:
        study.tell(trial, values, state=state or TrialState.COMPLETE)
    return trial


def recorded_study(name=None, *, sampler=None, objectives=("quality", "latency_ms", "size_mb"),
                   max_quality_drop=None):
    """An in-memory study of those objectives whose spec record names them (and the quality
    limit, when given)."""
    import optuna

    from paretoslim.search._store import StudyStore

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    directions = ["maximize" if n == "quality" else "minimize" for n in objectives]
    study = optuna.create_study(study_name=name, sampler=sampler, directions=directions)
    record = {"objectives": list(objectives)}
    if max_quality_drop is not None:
        record["max_quality_drop"] = max_quality_drop
    StudyStore(study).write_spec_record(record)
    return study
