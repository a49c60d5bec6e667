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


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server on 127.0.0.1, stopped (and its files removed) at the end."""
    from _servers import PostgresServer, PostgresUnavailable

    pytest.importorskip("psycopg2", reason="needs the postgres extra: pip install -e '.[test]'")
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres, request):
    """A fresh database on the test server for one test."""
    import re

    return postgres.create_database(re.sub(r"\W", "_", request.node.name).lower()[:60])


@pytest.fixture(scope="module")
def ray_cluster():
    """A running two-node Ray cluster (head 127.0.0.2 with ``target:cpu-x86``, worker
    127.0.0.3), every process of which is ended afterwards, also when a test fails."""
    pytest.importorskip("ray.tune", reason="needs ray[tune]: pip install -e '.[test]'")
    from _servers import RayCluster

    cluster = RayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftovers(), "Ray processes outlived the cluster"
