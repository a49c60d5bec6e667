import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _tiny import tiny_task  # noqa: E402


@pytest.fixture(scope="session")
def cnn_task():
    return tiny_task("cnn")


@pytest.fixture(scope="session")
def mlp_task():
    return tiny_task("mlp")
