"""``privrec serve --approximate influence`` (METHODS §13; issue 32, Build 2) on a tiny user-aware shards model.

A deletion request is answered at once by an approximate model (the shard that held the user moved by one
influence step without their samples) and then by the exact replay's adapters; the request's history and its
certificate say which served when, and only the exact one is certified: its certificate is the one the CLI gives.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import certificate_body, run_cli
from fastapi.testclient import TestClient
from serve_helpers import bearer, copy_model, tokens

from privrec.cli import main
from privrec.commands.forget import run_forget
from privrec.errors import UserError
from privrec.model.adapters import load_adapter_state, read_meta
from privrec.prepare import source_data
from privrec.serve import service as service_module
from privrec.serve.app import create_app
from privrec.serve.service import NotReady, Service
from privrec.unlearning.approx.task import InfluenceSection
from privrec.unlearning.exact.shards import shard_features

ROOT = Path(__file__).resolve().parents[1]
STEP = InfluenceSection(hessian_samples=8, iterations=4, damping=0.1)


@pytest.fixture(scope="module")
def shards_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("approx") / "model"
    assert main(["--no-progress", "shard-train", str(ROOT / "configs" / "apa-tiny.yaml"), "--out", str(out),
                 "--set", "shards.partition=semantic-users", "--set", "model.precision=fp32"]) == 0
    return out


def _victim(model: Path) -> tuple[int, int]:
    """(the user with the most training samples, the shard that holds them)."""
    best = None
    for folder in sorted((model / "adapters").iterdir()):
        users = [int(i.split("-")[0][1:]) for i in read_meta(folder)["sample_ids"]]
        for u in set(users):
            if best is None or users.count(u) > best[0]:
                best = (users.count(u), u, int(folder.name.split("-")[1]))
    return best[1], best[2]


def _forget_loss(rec, shard: int, state: dict, user: int) -> float:
    """Mean training loss of ``user``'s samples in ``shard`` under ``state``, prompts as the shard trained."""
    cfg, model = rec.cfg, rec.scorer.model
    universe = source_data(cfg)[1]
    ids = read_meta(rec.md.run / rec.md.manifest.adapters[shard].path)["sample_ids"]
    samples = sorted((universe[i] for i in ids), key=lambda s: s.sample_id)
    load_adapter_state(model.model, state)
    model.model.eval()
    with model.features_of(shard_features(cfg, samples)), torch.no_grad():
        batch = model.collate(model.encode([s for s in samples if s.user_id == user]))
        return float(F.binary_cross_entropy_with_logits(model.logits(batch), batch.labels))


def _wait(service: Service, rid: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        req = service.request(rid)
        assert not req.get("error"), req
        if req["status"] == "done":
            return req
        time.sleep(0.2)
    raise AssertionError(f"request {rid} not done in {timeout}s")


def test_an_approximate_answer_serves_at_once_and_the_certified_exact_one_replaces_it(shards_model, tmp_path,
                                                                                       monkeypatch):
    model = copy_model(shards_model, tmp_path / "model")
    user, shard = _victim(model)
    gate, reached = threading.Event(), threading.Event()
    exact = service_module.run_resume

    def held(*args, **kwargs):  # the exact replay waits until the approximate model has been looked at
        reached.set()
        assert gate.wait(120)
        return exact(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_resume", held)
    admin = tokens(model)["admin"]
    service = Service(model, candidates=None, approximate="influence", influence=STEP)
    http = TestClient(create_app(service))
    try:
        original = [dict(s) for s in service.rec.scorer.states]
        bystander = next(u for u in service.rec.users() if u != user)
        before = service.recommendations(bystander, 5)
        req, new = service.forget(user)
        rid = req["id"]
        service.start()
        assert reached.wait(300) and new

        rec = service.rec  # the approximate model serves
        assert rec.approximate == rid
        for k, (old, now) in enumerate(zip(original, rec.scorer.states)):  # only the user's shard moved
            moved = {n for n in old if not torch.equal(old[n], now[n])}
            assert bool(moved) == (k == shard), k
            assert all("lora_" in n for n in moved)  # adapter tensors only
        # toward forgetting: the user's samples lose fit under the moved adapter (a damped Newton step removing
        # them raises their loss to first order)
        assert _forget_loss(rec, shard, rec.scorer.states[shard], user) > _forget_loss(rec, shard, original[shard],
                                                                                        user)
        answer = service.recommendations(bystander, 5)
        assert answer["approximate"] == rid and "approximate" not in before
        pending = service.request(rid)
        assert [e["status"] for e in pending["history"]] == ["pending", "approximate"]
        assert pending["approximate"]["certified"] is False and str(shard) in pending["approximate"]["shards"]
        with pytest.raises(NotReady):
            service.certificate(rid)
        over_http = http.get(f"/v1/requests/{rid}", headers=bearer(admin)).json()  # the same over HTTP
        assert over_http["approximate"]["certified"] is False and over_http["history"][-1]["status"] == "approximate"
        got = http.get(f"/v1/users/{bystander}/recommendations?k=5", headers=bearer(admin)).json()
        assert got["approximate"] == rid

        gate.set()
        done = _wait(service, rid)
        deadline = time.time() + 60
        while service.rec.approximate and time.time() < deadline:
            time.sleep(0.1)
        assert service.rec.approximate is None  # the exact adapters replaced it
        assert [e["status"] for e in done["history"]] == ["pending", "approximate", "retrained", "installed", "done"]
        assert "approximate" not in service.recommendations(bystander, 5)
        cert = service.certificate(rid)
        approx, exact_row = cert["served"]
        assert approx["certified"] is False and exact_row["certified"] is True
        assert approx["from"] < approx["until"] == exact_row["from"]
        assert http.get(f"/v1/requests/{rid}/certificate", headers=bearer(admin)).json()["served"] == cert["served"]
        assert http.get(f"/v1/users/{bystander}/recommendations?k=5", headers=bearer(admin)).json()[
            "approximate"] is None
    finally:
        gate.set()
        service.close()
    # the exact route is untouched by what came first: the certificate privrec forget gives
    cli = copy_model(shards_model, tmp_path / "cli")
    assert certificate_body(cert) == certificate_body(run_forget(cli, users=[user], progress=False))
    assert main(["forget", str(model), "--verify"]) == 0


def test_approximate_answers_need_a_shards_model_and_valid_settings(shards_model, tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["--no-progress", "train", str(ROOT / "configs" / "tiny.yaml"), "--out", str(single),
                 "--set", "train.epochs=1", "--set", "eval.zero_shot=false"]) == 0
    with pytest.raises(UserError, match="needs a shards model"):
        Service(single, approximate="influence")
    code, _, err = run_cli(capsys, "serve", str(shards_model), "--approximate", "influence", "--approximate-set",
                           "damping=-1")
    assert code == 2 and "damping" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "serve", str(shards_model), "--approximate-set", "damping=0.1")
    assert code == 2 and "--approximate" in err
