"""Drivers of a compression search: task, study spec, backends, front, export, CLI."""

from ._errors import ParetoslimError
from ._task import Task, load_task

__all__ = ["ParetoslimError", "Task", "load_task"]
