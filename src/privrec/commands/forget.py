"""``privrec forget MODEL``: exact unlearning of users, samples or clients (METHODS §4, §7, §10), ``--resume`` of
an interrupted request and ``--verify``. The command parses its arguments and calls the engine: the request
state machine :mod:`privrec.unlearning.exact.forget`, verification :mod:`privrec.unlearning.exact.verify`, with
every kind's route (:data:`privrec.federated.forget.ROUTES`).
"""

from __future__ import annotations

from pathlib import Path

from privrec.config import ExecutorConfig
from privrec.data.idfiles import read_sample_ids
from privrec.errors import UserError
from privrec.federated.forget import ROUTES
from privrec.unlearning.exact import forget as engine
from privrec.unlearning.exact import verify
from privrec.unlearning.exact.routes import Fault


def parse_ids(text: str, option: str = "--users", what: str = "user") -> list[int]:
    """``"12,40"`` -> [12, 40] (the ids of ``--users`` or ``--clients``).

    Raises:
        UserError: empty or not a comma-separated list of integers."""
    try:
        ids = sorted({int(u) for u in text.split(",") if u.strip()})
    except ValueError:
        raise UserError(f"{option} expects comma-separated {what} ids, got {text!r}") from None
    if not ids:
        raise UserError(f"{option} is empty")
    return ids


def parse_users(text: str) -> list[int]:
    return parse_ids(text)


def parse_clients(text: str) -> list[int]:
    return parse_ids(text, "--clients", "client")


def run_forget(run_path: str | Path, users: list[int] | None = None, samples_file: str | Path | None = None,
               progress: bool = True, fault: Fault | None = None, clients: list[int] | None = None,
               retrain_federation: bool = False, remote=None, executor: ExecutorConfig | None = None) -> dict:
    """Delete users', samples' (a file of sample ids) or whole clients' data from a model that forgets exactly;
    returns the certificate (``{"noop": True, ...}`` when everything asked for is already deleted). See
    :func:`privrec.unlearning.exact.forget.run_forget`.

    Raises:
        UserError: an unreadable samples file, and what the engine raises.
    """
    if sum(x is not None for x in (users, samples_file, clients)) != 1:
        raise UserError("give exactly one of --users, --samples or --clients")
    sample_ids = read_sample_ids(samples_file) if samples_file is not None else None
    return engine.run_forget(run_path, users, sample_ids, progress, fault, clients, retrain_federation, remote,
                             routes=ROUTES, executor=executor)


def run_resume(run_path: str | Path, progress: bool = True, fault: Fault | None = None,
               executor: ExecutorConfig | None = None) -> dict | None:
    """Finish the model's first unfinished deletion request; its certificate, None when none is unfinished."""
    return engine.run_resume(run_path, progress, fault, routes=ROUTES, executor=executor)


def run_verify(run_path: str | Path) -> dict:
    """Re-check every certificate and every adapter of the model (:func:`privrec.unlearning.exact.verify
    .run_verify`); ``ok`` is False on any problem."""
    return verify.run_verify(run_path, routes=ROUTES)

