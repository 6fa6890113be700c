"""The executor seam: how a command runs its independent units (the shards of ``shard-train``, the shards a
``forget`` request retrains, the clients of an in-process ``federate`` round, blocks of users of the store fill of
``serve --precompute-only``), one after another in this process (``local``, the reference) or as Ray tasks
(``ray``) on a local cluster of single-threaded workers or on a running cluster (docs/scaling.md).

A command hands :meth:`Executor.map` a function ``fn(shared, item)`` defined at module level in privrec, one
``shared`` object (the model, its frozen-layer cache, the common init, the config) and the items (one per
unit). The function returns tensors and lineage; the driver alone writes the ledger and the model directory
(``on_result`` runs in the driver as each unit finishes). With Ray:

- ``shared`` goes into the object store once (``ray.put``) and reaches each worker process once: every task
  receives the same reference and a worker keeps the object it fetched for the tasks that follow;
- each task runs with one torch thread and is seeded by the unit itself (the shard's seed), so its result is
  bit for bit what ``local`` gives with ``model.threads: 1``;
- a task whose worker process dies is run again (``executor.max_retries``) with the same inputs: the same result;
- the progress of the tasks is printed on stderr: the workers' own lines (forwarded by Ray, prefixed with their
  pid) and one line in the driver as each unit finishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from privrec.config import ExecutorConfig
from privrec.errors import RunError, UserError

Log = Callable[[str], None]
OnResult = Callable[[int, Any], None]
RAY_TEMP = ".ray"  # Ray's temp folder under the model directory (default)

_SHARED: dict[str, Any] = {}  # in a Ray worker process: the shared object of the map it serves, fetched once


class Executor:
    """Runs ``fn(shared, item)`` for every item; results in the items' order."""

    kind = "local"

    def map(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any],
            labels: Sequence[str] | None = None, on_result: OnResult | None = None,
            log: Log | None = None, stop: Callable[[], bool] | None = None) -> list[Any]:
        """``on_result(i, result)`` is called in this process as item i finishes (here: in order). ``stop``:
        asked after each item; True ends the map early (the items not run yet stay None)."""
        out: list[Any] = [None] * len(items)
        for i, item in enumerate(items):
            if stop is not None and stop():
                break
            res = fn(shared, item)
            if on_result is not None:
                on_result(i, res)
            out[i] = res
        return out


def _ray_task(fn, shared_box: list, item):
    """One unit in a Ray worker: one torch thread; the shared object fetched once per worker process (it comes
    as a reference inside a list, so Ray does not resolve it for every task)."""
    import ray
    import torch

    torch.set_num_threads(1)
    ref = shared_box[0]
    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # another run's object replaces an earlier one's
        _SHARED[key] = ray.get(ref)
    return fn(_SHARED[key], item)


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, max_retries: int):
        self.max_retries = max_retries
        self._refs: dict[int, tuple[Any, Any]] = {}  # id(shared) -> (shared, its object ref): put once per run

    def _ref(self, ray, shared):
        """The object-store reference of ``shared``: the same Python object is put once, however many maps use
        it (a federation's rounds), so each worker fetches it once."""
        if id(shared) not in self._refs:
            self._refs[id(shared)] = (shared, ray.put(shared))
        return self._refs[id(shared)][1]

    def map(self, fn, shared, items, labels=None, on_result=None, log=None, stop=None):
        import ray

        if not items:
            return []
        labels = list(labels) if labels is not None else [f"task {i}" for i in range(len(items))]
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_ray_task)
        box = [self._ref(ray, shared)]
        refs = [task.options(name=f"privrec {lab}").remote(fn, box, item) for lab, item in zip(labels, items)]
        index = {r: i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(items)
        pending, done, t0 = list(refs), 0, time.perf_counter()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            out[i] = _get(ray, ready[0], labels[i])
            done += 1
            if log is not None:
                log(f"ray: {labels[i]} finished ({done}/{len(items)}, {time.perf_counter() - t0:.1f}s)")
            if on_result is not None:
                on_result(i, out[i])
            if pending and stop is not None and stop():  # the tasks still queued or running are cancelled
                for r in pending:
                    ray.cancel(r)
                if log is not None:
                    log(f"ray: stopped with {len(pending)} of {len(items)} tasks unfinished")
                break
        return out


def _get(ray, ref, label: str):
    """A task's result; its own error re-raised as itself (a UserError stays one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise RunError(f"ray: {label} failed: {str(e).splitlines()[0]}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as e:
        raise RunError(f"ray: {label} failed after its retries ({type(e).__name__}); see the Ray logs") from None


def _short_link(target: Path) -> Path:
    """A short path for Ray's temp folder (its Unix sockets live there, and a socket path may hold 107 bytes):
    a link ``<system temp>/privrec-ray-<hash of the target>`` to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    real = target.resolve()
    link = Path(tempfile.gettempdir()) / f"privrec-ray-{hashlib.sha256(str(real).encode()).hexdigest()[:10]}"
    if link.is_symlink() and link.resolve() != real:
        link.unlink()
    if not link.is_symlink():
        with contextlib.suppress(FileExistsError):
            os.symlink(real, link)
    return link


def check(cfg: ExecutorConfig) -> None:
    """Fail fast, in one line, before a command records or writes anything: ``ray`` needs the ray package, and
    ``address`` (``host:port``, or ``ray://host:port``) must accept a connection (``ray.init`` would wait on an
    unreachable one for minutes).

    Raises:
        UserError: ray is not installed, or nothing answers at the address.
    """
    if cfg.kind == "local":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("executor ray needs the ray package: pip install -e '.[federated]' (flwr[simulation] "
                        "brings it), or run with executor.kind=local") from None
    if cfg.address is None or cfg.address == "auto":
        return
    host, _, port = cfg.address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address / executor.address expects host:port (e.g. 10.0.0.1:6379), got "
                        f"{cfg.address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {cfg.address} ({e.strerror or type(e).__name__}); start one "
                        "with `ray start --head` (docs/scaling.md) or leave out --ray-address") from None


@contextlib.contextmanager
def open_executor(cfg: ExecutorConfig, home: Path, log: Log | None = None) -> Iterator[Executor]:
    """The executor of ``cfg`` for one command; ``home``: the model directory (Ray's temp folder goes under it
    unless ``cfg.temp_dir`` names one). A Ray session this process already has is used as it is and left
    running; one started here is shut down at the end (and its temp folder under ``home`` removed).

    Raises:
        UserError: ray is not installed, or the cluster at ``cfg.address`` cannot be reached.
    """
    if cfg.kind == "local":
        yield Executor()
        return
    check(cfg)
    import ray

    if ray.is_initialized():
        yield RayExecutor(cfg.max_retries)
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a FutureWarning; no GPUs used here
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = link = None
    try:
        if cfg.address is not None:
            where = f"the Ray cluster at {cfg.address}"
            ray.init(address=cfg.address, include_dashboard=False, configure_logging=False, log_to_driver=True)
        else:
            temp = Path(cfg.temp_dir) if cfg.temp_dir else Path(home) / RAY_TEMP
            where = f"a local Ray cluster of {cfg.workers or os.cpu_count()} workers (temp {temp})"
            link = _short_link(temp)
            ray.init(num_cpus=cfg.workers or os.cpu_count(), include_dashboard=False, configure_logging=False,
                     log_to_driver=True, _temp_dir=str(link))
    except Exception as e:  # noqa: BLE001 -- ConnectionError, RuntimeError, ValueError: all mean "no cluster"
        raise UserError(f"cannot start or join {where}: {' '.join(str(e).split())[:300]}") from None
    if log is not None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log(f"ray: joined {where}: {len(nodes)} node(s), {int(ray.cluster_resources().get('CPU', 0))} CPUs")
    try:
        yield RayExecutor(cfg.max_retries)
    finally:
        ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
        if temp is not None and cfg.temp_dir is None:
            shutil.rmtree(temp, ignore_errors=True)
        sys.stderr.flush()
