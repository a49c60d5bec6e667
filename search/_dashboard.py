"""optuna-dashboard serving a study's storage on the loopback interface."""

from __future__ import annotations

from ._errors import ParetoslimError
from ._store import make_storage, resolve_study, storage_of

HOST = "127.0.0.1"


def serve_dashboard(ref: str, storage: str | None = None, port: int = 8080) -> None:
    """Serve the storage holding study ``ref`` on 127.0.0.1:``port`` until interrupted."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise ParetoslimError(
            "the dashboard needs optuna-dashboard: pip install 'paretoslim[dashboard]'"
        ) from None
    study, spec = resolve_study(ref, storage)
    location = storage_of(spec, storage) if spec is not None else (
        storage or f"runs/{study.study_name}/journal.log")
    print(f"optuna-dashboard for study {study.study_name!r}: http://{HOST}:{port}/dashboard "
          "(Ctrl-C to stop)", flush=True)
    run_server(make_storage(location), host=HOST, port=port)
