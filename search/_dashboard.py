"""optuna-dashboard serving a study's storage on the loopback interface."""

from __future__ import annotations

import socket

from ._errors import ParetoslimError
from ._signals import signals_end_process
from ._storage import make_storage, storage_of
from ._study import resolve_study

HOST = "127.0.0.1"


def serve_dashboard(ref: str, storage: str | None = None, port: int = 8080) -> None:
    """Serve the storage holding study ``ref`` on 127.0.0.1:``port`` until interrupted.

    Raises ParetoslimError for a port out of 1-65535 or one already in use.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ParetoslimError(f"--port must be in 1-65535. Got {port!r}.")
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ParetoslimError(
            "the dashboard needs optuna-dashboard: pip install 'paretoslim[dashboard]'"
        ) from None
    study, spec = resolve_study(ref, storage)
    location = storage_of(spec, storage) if spec is not None else (
        storage or f"runs/{study.study_name}/journal.log")
    _check_port(port)
    print(f"optuna-dashboard for study {study.study_name!r}: http://{HOST}:{port}/dashboard "
          "(Ctrl-C to stop)", flush=True)
    try:
        with signals_end_process():  # its request handlers would swallow KeyboardInterrupt
            run_server(make_storage(location, writable=False), host=HOST, port=port)
    except OSError as exc:  # taken between the check and the server's bind
        raise ParetoslimError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}; pass "
                              "another --port") from None


def _check_port(port: int) -> None:
    """Raise ParetoslimError when ``port`` on 127.0.0.1 cannot be bound (e.g. in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise ParetoslimError(f"cannot serve on {HOST}:{port}: {exc.strerror or exc}; "
                                  "pass another --port") from None
