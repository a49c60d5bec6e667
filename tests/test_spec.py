from pathlib import Path

import pytest

from paretoslim.search import ParetoslimError, load_spec, parse_spec
from paretoslim.spaces import Choice, FloatRange

STUDIES = Path(__file__).parents[1] / "studies"


def _spec_file(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_defaults():
    spec = parse_spec({"task": "t.py:make_task"})
    assert spec.objectives == ("quality", "latency_ms", "size_mb")
    assert spec.directions == ["maximize", "minimize", "minimize"]
    assert spec.constraints.max_quality_drop == 0.01
    assert spec.sampler.name == "nsga2"
    assert spec.name == "study"


def test_shipped_fashion_mnist_spec_is_valid():
    spec = load_spec(STUDIES / "fashion_mnist.toml")
    assert spec.name == "fashion_mnist"
    assert (spec.base_dir / spec.task.split(":")[0]).is_file()
    assert isinstance(spec.space.domains["quantization.scheme"], Choice)


def test_the_batch_one_study_shares_the_default_studys_space_and_elastic_student():
    """Its candidates are the default study's: the elastic student and the predicted
    quality drops cached by one serve the other."""
    default = load_spec(STUDIES / "fashion_mnist.toml")
    batch1 = load_spec(STUDIES / "fashion_mnist_batch1.toml")
    assert batch1.latency.batch_size == 1 and batch1.name != default.name
    assert batch1.space == default.space and batch1.candidates == default.candidates
    assert (batch1.task, batch1.seed, batch1.stopping) == (default.task, default.seed,
                                                           default.stopping)


def test_full_spec(tmp_path):
    path = _spec_file(tmp_path, """
task = "my_task.py:make_task"
name = "mine"
trials = 5
seed = 3
objectives = ["quality", "latency_ms"]
[task_options]
data_dir = "/data"
[constraints]
max_quality_drop = 0.02
[sampler]
name = "tpe"
[finetune]
steps = 10
learning_rate = 1e-3
threads = 1
[latency]
batch_size = 1
threads = 2
[space.pruning]
ratio = { low = 0.0, high = 0.5, step = 0.1 }
[space.quantization]
scheme = ["fp32", "int8_static"]
""")
    spec = load_spec(path)
    assert (spec.name, spec.trials, spec.seed) == ("mine", 5, 3)
    assert spec.task_options == {"data_dir": "/data"}
    assert spec.sampler.name == "tpe" and spec.latency.batch_size == 1
    assert spec.space.domains["pruning.ratio"] == FloatRange(0.0, 0.5, 0.1)
    assert spec.base_dir == tmp_path
    from paretoslim.search import TrialSettings

    assert TrialSettings.from_spec(spec).finetune.threads == 1


@pytest.mark.parametrize("text, message", [
    ('task = "t.py:f"\ntrails = 3\n',
     "unknown key 'trails' in the top level .*did you mean 'trials'"),
    ('task = "t.py:f"\ntrials = "many"\n', "key 'trials' must be int. Got str"),
    ('task = "t.py:f"\ntrials = 0\n', "trials must be >= 1"),
    ('task = "t.py:f"\n[finetune]\nsteps = -1\n', "finetune.steps must be >= 0"),
    ('task = "t.py:f"\n[finetune]\nthreads = -2\n', r"finetune.threads must be in \[0, 1024\]"),
    ('task = "t.py:f"\n[finetune]\nlearning_rate = nan\n',
     "finetune.learning_rate must be a finite number. Got nan."),
    ('task = "t.py:f"\nname = "../../escape"\n', "name must be a file name"),
    ('task = "t.py:f"\nseed = -1\n', r"seed must be in \[0, 4294967295\]"),
    ('task = "t.py:f"\n[[seeds]]\npruning = 3\n', "Recipe section 'pruning' must be a dict"),
    ('task = "t.py:f"\n[finetune]\nlearning_rate = "fast"\n',
     "'finetune.learning_rate' must be float"),
    ('task = "t.py:f"\n[latency]\nthread = 2\n', "unknown key 'latency.thread' in \\[latency\\]"),
    ('task = "t.py:f"\n[latency]\ntarget = "tpu"\n', "latency.target must be one of"),
    ('task = "t.py:f"\n[sampler]\nname = "cmaes"\n', "sampler.name must be one of"),
    ('task = "t.py:f"\nobjectives = ["accuracy"]\n', "objectives must be one of"),
    ('task = "t.py:f"\n[space.pruning]\nratio = { low = 0.0, high = 1.5 }\n',
     "space.pruning.ratio: The 'ratio' parameter of PruningConfig must be in"),
    ('task = "t.py:f"\n[space.pruning]\nrate = 0.1\n', "unknown key 'space.pruning.rate'"),
    ('trials = 3\n', "missing key 'task'"),
    ('task = "t.py:f"\ntrials = [\n', "not valid TOML"),
])
def test_spec_errors_name_file_and_key(tmp_path, text, message):
    path = _spec_file(tmp_path, text)
    with pytest.raises(ParetoslimError, match=message) as info:
        load_spec(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(ParetoslimError, match="study spec not found"):
        load_spec(tmp_path / "nope.toml")


def test_trial_settings_hold_the_specs_sections():
    from paretoslim.search import FinetuneSpec, LatencySpec, TrialSettings

    spec = parse_spec({"task": "t.py:f", "seed": 4, "finetune": {"steps": 7},
                       "latency": {"batch_size": 2}})
    settings = TrialSettings.from_spec(spec)
    assert (settings.finetune, settings.latency, settings.seed) == (spec.finetune,
                                                                   spec.latency, 4)
    assert TrialSettings() == TrialSettings(FinetuneSpec(), LatencySpec(), 0)
    # no time budget, from Python only (TOML has no null)
    assert TrialSettings(FinetuneSpec(trial_timeout_s=None)).finetune.trial_timeout_s is None
    with pytest.raises(ValueError, match="trial_timeout_s must be in"):
        FinetuneSpec(trial_timeout_s=0.0)
