"""The executor seam (issue 33): ``executor: ray`` gives what ``local`` gives, bit for bit, on the tiny model.

One Ray session (2 CPUs) serves every test of the module: a command finding Ray already started uses it as it
is (what ``--workers 2`` would start costs seconds each time). fp32 is pinned: equality is exact.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import certificate_body, only_certificate

from privrec.cli import main
from privrec.commands import shard_train
from privrec.commands.forget import run_forget, run_resume
from privrec.commands.shard_train import run_shard_train
from privrec.config import ExecutorConfig, load_config
from privrec.model.adapters import read_adapter
from privrec.unlearning.exact import routes, shards
from privrec.unlearning.exact.ledger import Ledger
from privrec.unlearning.exact.shards import ApaConfig

ray = pytest.importorskip("ray")
# the workers cannot import this test module: its functions (the worker-killing unit) travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]
APA_TINY = str(ROOT / "configs" / "apa-tiny.yaml")
RAY2 = ExecutorConfig(kind="ray", workers=2)


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    from privrec.executor import _short_link

    temp = tmp_path_factory.mktemp("ray")
    link = _short_link(temp)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, _temp_dir=str(link))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    link.unlink(missing_ok=True)


# fp32, and the cheapest shards run: a random partition (no features to compute), one aggregation, few test samples
FAST = ["model.precision=fp32", "shards.partition=random", "shards.aggregations=[uniform]", "shards.primary=uniform",
        "data.n_test=8"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(APA_TINY, FAST, cls=ApaConfig)


@pytest.fixture(scope="module")
def local(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        run_shard_train(cfg, out, progress=False)
    return out


def files(run: Path) -> dict[str, bytes]:
    """Every adapter's tensor file."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("adapters/*/adapter_model.safetensors"))}


def lineage(run: Path) -> dict[str, dict]:
    """Every adapter's metadata but its training time."""
    return {p.name: {k: v for k, v in read_adapter(p)[1].items() if k != "train_seconds"}
            for p in sorted((run / "adapters").iterdir())}


def ledger_rows(run: Path) -> list[tuple]:
    """The ledger's adapter rows (a request's random id named by its place)."""
    with sqlite3.connect(run / "ledger.sqlite") as db:
        rows = db.execute("SELECT seq, shard, tensors_sha256, lineage_sha256, n_samples, origin FROM adapters "
                          "ORDER BY seq").fetchall()
    return [r[:5] + (r[5] if not r[5].startswith("r-") else "REQUEST",) for r in rows]


def manifest(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())


def kill_once_then_train(markers: str, kill: frozenset, shared, job):
    """A shard's unit that kills its own worker process the first time it runs (a marker file remembers), then,
    run again by Ray, trains the shard."""
    marker = Path(markers) / f"shard-{job.k}"
    if job.k in kill and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return shards.train_task(shared, job)


def test_ray_shard_train_equals_local_even_when_a_worker_is_killed(ray_session, local, cfg, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setattr(shard_train, "train_task",
                        functools.partial(kill_once_then_train, str(markers), frozenset({1})))
    out = tmp_path / "run"
    run_shard_train(cfg, out, progress=False, executor=RAY2)
    assert int((markers / "shard-1").read_text()) != os.getpid()  # a worker process died mid-task
    assert files(out) == files(local) and len(files(out)) == 4  # fp32: bit-identical adapters
    assert lineage(out) == lineage(local)
    assert ledger_rows(out) == ledger_rows(local)
    assert manifest(out) == manifest(local)
    assert json.loads((out / "metrics.json").read_text())["auc_by_aggregation"] == \
        json.loads((local / "metrics.json").read_text())["auc_by_aggregation"]


def victims(run: Path) -> list[int]:
    """One user of shard 0 and one of shard 2 (a request that retrains at least two shards)."""
    metas = lineage(run)
    first = [int(metas[f"shard-{k}"]["sample_ids"][0][1:].split("-")[0]) for k in (0, 2)]
    assert first[0] != first[1]
    return first


@pytest.fixture(scope="module")
def forgotten(local, tmp_path_factory):
    """A copy of the local run after a local forget of :func:`victims`: the reference."""
    out = shutil.copytree(local, tmp_path_factory.mktemp("forgotten") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        assert main(["--no-progress", "forget", str(out), "--users", ",".join(map(str, victims(local)))]) == 0
    assert len(only_certificate(out)["body"]["affected_shards"]) >= 2
    return out


def test_ray_forget_gives_the_local_certificate(ray_session, local, forgotten, tmp_path, capsys):
    run = shutil.copytree(local, tmp_path / "run")
    assert main(["--no-progress", "forget", str(run), "--users", ",".join(map(str, victims(local))),
                 "--workers", "2"]) == 0
    assert capsys.readouterr().err.count("ray: shard") >= 2  # the retrained shards ran as Ray tasks
    assert certificate_body(only_certificate(run)) == certificate_body(only_certificate(forgotten))
    assert files(run) == files(forgotten)
    assert ledger_rows(run) == ledger_rows(forgotten)


class Crash(Exception):
    pass


def test_ray_forget_interrupted_with_a_shard_staged_resumes_to_the_local_certificate(
        ray_session, local, forgotten, tmp_path, monkeypatch):
    run = shutil.copytree(local, tmp_path / "run")
    real = routes.save_trained

    def save_then_crash(*a, **k):  # the driver stops with one shard staged, the others still running in Ray
        real(*a, **k)
        raise Crash()

    monkeypatch.setattr(routes, "save_trained", save_then_crash)
    with pytest.raises(Crash):
        run_forget(run, users=victims(local), progress=False, executor=RAY2)
    monkeypatch.setattr(routes, "save_trained", real)
    req = Ledger(run / "ledger.sqlite", create=False).unfinished()
    assert len(list((run / "staging" / req["id"]).glob("shard-*"))) == 1
    cert = run_resume(run, progress=False, executor=RAY2)  # keeps the staged shard, retrains the others
    assert certificate_body(cert) == certificate_body(only_certificate(forgotten))
    assert files(run) == files(forgotten)


KILL_AFTER_FIRST_SAVE = """
import os, signal, sys
from privrec.unlearning.exact import routes
from privrec.commands.forget import run_forget
from privrec.config import ExecutorConfig
real = routes.save_trained
def save_then_die(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # the driver dies with one shard staged, the other still in Ray
routes.save_trained = save_then_die
run_forget(sys.argv[1], users=[int(u) for u in sys.argv[2].split(",")], progress=False,
           executor=ExecutorConfig(kind="ray", address=sys.argv[3]))
"""


@pytest.mark.slow  # a second driver process joining the cluster: ~45 s on a shared 2-core machine
def test_ray_forget_resumes_after_the_driver_is_killed(ray_session, local, forgotten, tmp_path, capsys):
    run = shutil.copytree(local, tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    users = ",".join(map(str, victims(local)))
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SAVE, str(run), users, ray_session], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    req = Ledger(run / "ledger.sqlite", create=False).unfinished()
    assert req is not None and len(list((run / "staging" / req["id"]).glob("shard-*"))) == 1
    assert main(["--no-progress", "forget", str(run), "--resume", "--workers", "2"]) == 0
    assert certificate_body(only_certificate(run)) == certificate_body(only_certificate(forgotten))
    assert files(run) == files(forgotten)


def checkpoint_files(run: Path) -> dict[str, bytes]:
    """Every checkpoint's tensors and optimizer state (sliced shards, METHODS §9)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("slices/*/stage-*/*"))
            if p.suffix in (".safetensors", ".pt")}


def test_sliced_shards_train_and_replay_as_ray_tasks_as_they_do_locally(ray_session, cfg, tmp_path, capsys):
    """A sliced shard (shards.slices=2) is one Ray task that returns its checkpoints: shard-train and a forget
    request's replay give the local run's adapters, checkpoints, ledger and certificate bit for bit."""
    sliced = load_config(APA_TINY, [*FAST, "shards.slices=2"], cls=ApaConfig)
    runs = {}
    for name, ex in (("local", None), ("ray", RAY2)):
        runs[name] = tmp_path / name / "run"
        run_shard_train(sliced, runs[name], progress=False, executor=ex)
    assert capsys.readouterr().err.count("ray: shard") >= 4
    assert len(checkpoint_files(runs["ray"])) == 8  # 4 shards x 1 checkpoint x (adapter, optimizer)
    assert checkpoint_files(runs["ray"]) == checkpoint_files(runs["local"])
    assert files(runs["ray"]) == files(runs["local"]) and lineage(runs["ray"]) == lineage(runs["local"])
    users = ",".join(map(str, victims(runs["local"])))
    for name, extra in (("local", []), ("ray", ["--workers", "2"])):
        assert main(["--no-progress", "forget", str(runs[name]), "--users", users, *extra]) == 0
    err = capsys.readouterr().err
    assert "ray: shard" in err and "replayed stages" in err  # the replays ran as Ray tasks
    assert certificate_body(only_certificate(runs["ray"])) == certificate_body(only_certificate(runs["local"]))
    assert files(runs["ray"]) == files(runs["local"])
    assert checkpoint_files(runs["ray"]) == checkpoint_files(runs["local"])
    assert ledger_rows(runs["ray"]) == ledger_rows(runs["local"])
    assert main(["--no-progress", "forget", str(runs["ray"]), "--verify"]) == 0


def test_bad_worker_count_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--no-progress", "shard-train", APA_TINY, "--out", str(tmp_path / "run"), "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--workers" in err


def test_an_unreachable_ray_address_is_one_line_before_anything_is_recorded(local, tmp_path, capsys):
    run = shutil.copytree(local, tmp_path / "run")
    code = main(["--no-progress", "forget", str(run), "--users", str(victims(local)[0]), "--ray-address",
                 "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no Ray cluster answers at 127.0.0.1:9" in err
    assert Ledger(run / "ledger.sqlite", create=False).unfinished() is None


def test_ray_federate_equals_local(ray_session, tmp_path):
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import run_federate

    fast = ["model.precision=fp32", "data.n_train=60", "data.n_valid=24", "data.n_test=24"]
    cfg = load_config(str(ROOT / "configs" / "pplr-tiny.yaml"), fast, cls=FederatedConfig)
    metrics = {name: run_federate(cfg, tmp_path / name, progress=False, executor=ex)
               for name, ex in (("local", None), ("ray", RAY2))}
    assert files(tmp_path / "ray") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 3
    assert lineage(tmp_path / "ray") == lineage(tmp_path / "local")
    assert [r["mean_train_loss"] for r in metrics["ray"]["rounds"]] == \
        [r["mean_train_loss"] for r in metrics["local"]["rounds"]]
    assert metrics["ray"]["auc"] == metrics["local"]["auc"]


def test_ray_store_fill_equals_local(ray_session, served_model, tmp_path):
    from serve_helpers import copy_model

    from privrec.serve.service import Service

    stores = {}
    for name, ex in (("local", None), ("ray", RAY2)):
        model = copy_model(served_model, tmp_path / name)
        service = Service(model, candidates=8, store_k=5, precompute=True, executor=ex)
        try:
            users = service.rec.users()[:20]  # two blocks of FILL_BLOCK=16
            assert service.precompute_now(users) == 20
        finally:
            service.close()
        stores[name] = (model / "serve" / "recommendations.json").read_text()
    assert stores["ray"] == stores["local"]


def test_a_live_service_applies_a_deletion_with_ray_as_it_does_locally(ray_session, local, tmp_path, capsys):
    """``privrec serve --workers N``: a deletion on a shards model retrains its shards as Ray tasks; the same
    certificate body and adapters as a service without Ray."""
    import time

    from privrec.serve.service import Service

    user = victims(local)[0]
    out = {}
    for name, ex in (("local", None), ("ray", RAY2)):
        run = shutil.copytree(local, tmp_path / name)
        service = Service(run, candidates=8, store_k=5, precompute=False, executor=ex)
        try:
            rid = service.forget(user)[0]["id"]
            service.start()
            deadline = time.time() + 300
            while service.request(rid)["status"] != "done":
                assert time.time() < deadline and not service.request(rid).get("error")
                time.sleep(0.2)
        finally:
            service.close()
        out[name] = run
    assert "ray: shard" in capsys.readouterr().err
    assert certificate_body(only_certificate(out["ray"])) == certificate_body(only_certificate(out["local"]))
    assert files(out["ray"]) == files(out["local"])


def square_after(seconds: float, _shared, x: int) -> int:
    import time

    time.sleep(seconds)
    return x * x


def test_a_stopped_map_cancels_what_is_left(ray_session, tmp_path):
    """The store's fill stops when a deletion arrives: ``stop`` ends a map early, locally and on Ray."""
    from privrec.executor import open_executor

    for ex in (ExecutorConfig(), RAY2):
        seen: list[int] = []
        with open_executor(ex, tmp_path, None) as e:
            out = e.map(functools.partial(square_after, 0.5), None, list(range(8)),
                        on_result=lambda i, _r, seen=seen: seen.append(i), stop=lambda seen=seen: len(seen) >= 2)
        assert 2 <= len(seen) < 8 and all(out[i] == i * i for i in seen)
        assert all(out[i] is None for i in range(8) if i not in seen)

