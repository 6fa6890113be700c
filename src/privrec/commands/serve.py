"""``privrec serve MODEL`` and ``privrec token create / revoke MODEL`` (METHODS §11, docs/serving.md).

``serve`` starts the service of :mod:`privrec.serve` on uvicorn (one process: the service's deletion worker
and its recommender live in it) and stops on Ctrl-C or SIGTERM; ``--precompute-only`` writes every user's
top-k into the store and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from privrec.config import ExecutorConfig
from privrec.errors import UserError


def run_serve(model: str | Path, host: str = "127.0.0.1", port: int = 8080, candidates: int | None = 50,
              blend: float = 0.0, store_k: int = 20, precompute: bool = False, progress: bool = False,
              source: str = "popularity", refill_before_swap: bool = True,
              executor: ExecutorConfig | None = None, approximate: str | None = None, influence=None) -> None:
    """Serve ``model`` until interrupted (``refill_before_swap``, ``executor``, ``approximate``, ``influence``: see
    :class:`~privrec.serve.service.Service`).

    Raises:
        RunError: not a model directory, another privrec command holds it, an unfinished request that fails.
    """
    import uvicorn

    from privrec.serve.app import create_app
    from privrec.serve.service import Service

    _check(candidates, blend, store_k, source)
    service = Service(model, candidates=candidates, blend=blend, store_k=store_k, precompute=precompute,
                      progress=progress, source=source, refill_before_swap=refill_before_swap, executor=executor,
                      approximate=approximate, influence=influence)
    try:
        if approximate:
            print(f"privrec serve: a deletion is answered at once by an approximate model ({approximate}); the "
                  "exact one replaces it and alone is certified", file=sys.stderr)
        if service.refusal is not None:  # said when it starts, and on its page (no promise, no button)
            print(f"privrec serve: deletion requests will be refused (409): {service.refusal}", file=sys.stderr)
        service.start()
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()


def influence_section(settings: list[str]):
    """The influence step's settings from ``KEY=VALUE`` strings (``unlearn.influence``'s keys), read as ``--set``
    reads its overrides.

    Raises:
        UserError: not KEY=VALUE, an unknown key or a bad value (one line)."""
    from privrec.config import apply_overrides, parse_config
    from privrec.errors import ConfigError
    from privrec.unlearning.approx.task import InfluenceSection

    try:
        return parse_config(apply_overrides({}, settings), InfluenceSection)
    except ConfigError as e:
        raise UserError(f"--approximate-set {e}") from None


def run_precompute(model: str | Path, candidates: int | None = 50, blend: float = 0.0, store_k: int = 20,
                   progress: bool = False, source: str = "popularity", executor: ExecutorConfig | None = None) -> int:
    """Every user's top-``store_k`` into ``MODEL/serve/recommendations.json``; returns how many users.
    ``executor``: the users in one process (default) or in blocks as Ray tasks (the same store)."""
    from privrec.serve.service import Service

    _check(candidates, blend, store_k, source)
    service = Service(model, candidates=candidates, blend=blend, store_k=store_k, precompute=True,
                      progress=progress, source=source, executor=executor)
    try:
        return service.precompute_now()
    finally:
        service.close()


def _check(candidates: int | None, blend: float, store_k: int, source: str) -> None:
    from privrec.recommender import check_source

    check_source(source)
    if candidates is not None and candidates < 1:
        raise UserError(f"--candidates must be at least 1 (or 0 for every unseen item), got {candidates}")
    if not 0.0 <= blend <= 1.0:
        raise UserError(f"--blend must be in [0, 1], got {blend}")
    if store_k < 1:
        raise UserError(f"--store-k must be at least 1, got {store_k}")


def run_token_create(model: str | Path, user: int | None) -> tuple[str, dict]:
    """A new token (user or admin). Raises: RunError (not a model directory), UserError (unknown user)."""
    from privrec.data import load_dataset
    from privrec.recommender import open_model
    from privrec.serve.auth import create_token

    if user is not None:
        cfg = open_model(model, pending_ok=True).cfg
        ds = load_dataset(cfg.data.source, cfg.data.path)
        if not (ds.inter["user_id"] == user).any():
            raise UserError(f"user {user} not found in {ds.name}")
    return create_token(model, user)


def run_token_revoke(model: str | Path, token_id: str) -> dict:
    from privrec.serve.auth import revoke_token

    return revoke_token(model, token_id)
