"""kill -9 of a real `privrec serve` process while a deletion is retraining: started again, it finishes the
request with the same certificate body as an uninterrupted `privrec forget` of the same request on a copy."""

from __future__ import annotations

import time

import httpx
from conftest import certificate_body
from serve_helpers import Server, bearer, copy_model, tokens, victim_of, wait_done

from privrec.commands.forget import run_forget
from privrec.unlearning.exact.ledger import DONE, PENDING, Ledger


def slow_retrain(model):
    """The same model, retraining for 4 epochs instead of 1: a window wide enough to kill it in."""
    path = model / "config.yaml"
    text = path.read_text()
    assert "  epochs: 1\n" in text
    path.write_text(text.replace("  epochs: 1\n", "  epochs: 4\n"))
    return model


def test_kill_9_while_retraining_then_restart_finishes_with_the_same_certificate(served_model, tmp_path):
    model, uninterrupted = (slow_retrain(copy_model(served_model, tmp_path / n)) for n in ("served", "plain"))
    victim = victim_of(model)
    tok = tokens(model, victim)
    reference = run_forget(uninterrupted, users=[victim], progress=False)

    server = Server(model, tmp_path)
    try:
        r = httpx.post(f"{server.url}/v1/users/{victim}/forget", headers=bearer(tok[victim]), timeout=60)
        assert r.status_code == 202, r.text
        rid = r.json()["id"]
        log = model / "log.txt"
        deadline = time.time() + 120
        while f"forget {rid}: purged" not in log.read_text():  # the worker has started retraining
            assert time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.005)
        server.kill9()
    finally:
        server.stop()
    ledger = Ledger(model / "ledger.sqlite", create=False)
    status = ledger.request(rid)["status"]
    ledger.close()
    assert status == PENDING  # killed while retraining
    assert not (model / "certificates" / f"{rid}.json").exists()

    server = Server(model, tmp_path)  # the lock died with the process; the worker resumes the request
    try:
        assert httpx.get(f"{server.url}/v1/users/{victim}/recommendations", headers=bearer(tok[victim]),
                         timeout=60).status_code == 410
        done = wait_done(lambda p: httpx.get(server.url + p, headers=bearer(tok["admin"]), timeout=60), rid)
        cert = httpx.get(f"{server.url}/v1/requests/{rid}/certificate", headers=bearer(tok[victim]), timeout=60)
    finally:
        server.stop()
    assert cert.status_code == 200
    assert certificate_body(cert.json()) == certificate_body(reference)
    steps = [e["status"] for e in done["history"]]
    assert steps[0] == PENDING and steps[-1] == DONE and steps.count("retrained") == 1  # once: after the restart
