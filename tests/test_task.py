import textwrap

import pytest

from paretoslim.search import ParetoslimError, Task, load_task

TINY = str(__import__("pathlib").Path(__file__).parent)


def _write(tmp_path, body, name="user_task.py"):
    path = tmp_path / name
    header = (f"import sys\nsys.path.insert(0, {TINY!r})\nimport torch\n"
              "from _tiny import tiny_task, TinyMLP\nfrom paretoslim.search import Task\n")
    path.write_text(header + textwrap.dedent(body))
    return path


def test_user_task_from_a_file_outside_studies(tmp_path):
    _write(tmp_path, """
        def make_task():
            return tiny_task("mlp")
    """)
    task = load_task("user_task.py:make_task", base_dir=tmp_path)
    assert isinstance(task, Task) and task.name == "tiny_mlp"


def test_task_options_are_passed_to_the_factory(tmp_path):
    _write(tmp_path, """
        def make_task(hidden=64):
            task = tiny_task("mlp")
            task.extras["hidden"] = hidden
            return task
    """)
    task = load_task(f"{tmp_path}/user_task.py:make_task", options={"hidden": 7})
    assert task.extras["hidden"] == 7


def test_task_from_a_module_path():
    task = load_task("_tiny:tiny_task", options={"kind": "mlp"})
    assert task.name == "tiny_mlp"


@pytest.mark.parametrize("body, reference, message", [
    ("def make_task():\n    raise RuntimeError('no GPU here')\n", "user_task.py:make_task",
     "factory raised RuntimeError: no GPU here"),
    ("def make_task():\n    return 42\n", "user_task.py:make_task",
     "returned int, expected paretoslim.search.Task"),
    ("def make_task():\n    return Task(model=TinyMLP(), train=[], val=[], "
     "example_input=torch.zeros(2, 3))\n", "user_task.py:make_task",
     "cannot run on example_input of shape \\(2, 3\\)"),
    ("", "user_task.py:missing", "has no attribute 'missing'"),
    ("", "nowhere.py:make_task", "does not exist"),
    ("", "make_task", "expected 'path/to/file.py:make_task'"),
    ("", "no_such_module_xyz:make_task", "cannot import module"),
    ("raise ImportError('broken import')\n", "user_task.py:make_task",
     "importing .* raised ImportError: broken import"),
])
def test_bad_tasks_get_clear_errors(tmp_path, body, reference, message):
    _write(tmp_path, body)
    with pytest.raises(ParetoslimError, match=message):
        load_task(reference, base_dir=tmp_path)


def test_task_validates_field_types():
    with pytest.raises(TypeError, match="Task.model must be a torch.nn.Module"):
        Task(model="resnet", train=[], val=[], example_input=None)
