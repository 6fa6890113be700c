"""privrec serve in-process (FastAPI TestClient) on the tiny model: endpoints, errors as {"error": ...} with
their 4xx, tokens, the 410 from the moment a deletion is accepted, deletions applied by the worker through
privrec forget's procedure (the same certificates as the CLI), the store of precomputed recommendations."""

from __future__ import annotations

import json
import time

import pytest
from conftest import certificate_body
from fastapi.testclient import TestClient
from serve_helpers import bearer, copy_model, tokens, victim_of, wait_done

from privrec.cli import main
from privrec.commands.forget import run_forget
from privrec.commands.recommend import run_recommend
from privrec.recommender import Recommender, blended_order
from privrec.rundir import LEDGER_FILE, MANIFEST_FILE
from privrec.serve.app import MAX_BATCH, create_app
from privrec.serve.service import Service
from privrec.serve.store import NEXT_FILE, STORE_FILE, RecStore


@pytest.fixture(scope="module")
def live(served_model, tmp_path_factory):
    """A service on a copy of the model, never started (no deletion is applied): for read-only checks."""
    model = copy_model(served_model, tmp_path_factory.mktemp("api") / "model")
    victim = victim_of(model)
    other = next(u for u in range(1, 50) if u != victim)
    tok = tokens(model, victim, other)
    service = Service(model, candidates=20)
    with TestClient(create_app(service)) as client:
        yield client, tok, victim, other, model
    service.close()


def get(client, path, token=None):
    return client.get(path, headers=bearer(token) if token else {})


def error_of(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


def test_recommendations_are_the_two_stage_ranking_of_privrec_recommend(live):
    client, tok, victim, other, model = live
    r = get(client, f"/v1/users/{other}/recommendations?k=5", tok[other])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "online" and body["candidates"] == 20 and len(body["items"]) == 5
    cli = run_recommend(model, other, 5, progress=False, candidates=20)
    assert [x["item_id"] for x in body["items"]] == [x["item_id"] for x in cli]
    assert [x["p_yes"] for x in body["items"]] == pytest.approx([x["p_yes"] for x in cli])
    rated = {h["item_id"] for h in get(client, f"/v1/users/{other}/history", tok[other]).json()["ratings"]}
    assert rated and not rated & {x["item_id"] for x in body["items"]}
    ps = [x["p_yes"] for x in body["items"]]
    assert ps == sorted(ps, reverse=True) and all(0 < p < 1 for p in ps)


def test_score_matches_recommendations_and_keeps_the_input_order(live):
    client, tok, victim, other, model = live
    items = get(client, f"/v1/users/{other}/recommendations?k=3", tok[other]).json()["items"]
    pairs = [{"user": other, "item": x["item_id"]} for x in reversed(items)]
    r = client.post("/v1/score", headers=bearer(tok[other]), json={"pairs": pairs})
    assert r.status_code == 200, r.text
    got = r.json()["scores"]
    assert [(s["user"], s["item"]) for s in got] == [(p["user"], p["item"]) for p in pairs]
    assert [s["p_yes"] for s in got] == pytest.approx([x["p_yes"] for x in reversed(items)], abs=1e-6)
    mixed = [{"user": other, "item": 1}, {"user": victim, "item": 2}, {"user": other, "item": 3}]
    r = client.post("/v1/score", headers=bearer(tok["admin"]), json={"pairs": mixed})
    assert r.status_code == 200 and [s["user"] for s in r.json()["scores"]] == [other, victim, other]


def test_tokens_401_403_and_admin(live):
    client, tok, victim, other, model = live
    path = f"/v1/users/{other}/recommendations?k=2"
    assert "missing bearer token" in error_of(get(client, path), 401)
    assert get(client, path).headers["www-authenticate"] == "Bearer"
    error_of(client.get(path, headers={"Authorization": "Basic abc"}), 401)
    error_of(get(client, path, "prv_00000000_forged"), 401)
    error_of(get(client, path, tok[other][:-2] + "xx"), 401)  # right id, wrong secret
    assert "cannot read or delete user" in error_of(get(client, path, tok[victim]), 403)
    error_of(get(client, f"/v1/users/{other}/history", tok[victim]), 403)
    error_of(client.post(f"/v1/users/{other}/forget", headers=bearer(tok[victim])), 403)
    error_of(client.post("/v1/score", headers=bearer(tok[victim]), json={"pairs": [{"user": other, "item": 1}]}),
             403)
    assert get(client, path, tok["admin"]).status_code == 200
    assert get(client, "/v1/me", tok[other]).json() == {"token_id": tok[other].split("_")[1], "user": other,
                                                         "admin": False, "forgets_by": "retrain-all"}
    error_of(get(client, "/metrics", tok[other]), 403)
    m = get(client, "/metrics", tok["admin"]).json()
    assert m["routes"]["GET /v1/users/{user}/recommendations"]["by_status"]["403"] >= 1


def test_a_revoked_token_is_refused_without_a_restart(live, capsys):
    client, tok, victim, other, model = live
    assert main(["token", "create", str(model), "--user", str(other)]) == 0
    token = capsys.readouterr().out.strip()
    assert get(client, "/v1/me", token).status_code == 200
    assert json.loads((model / "serve" / "tokens.json").read_text())["tokens"][-1]["sha256"] != token
    assert token not in (model / "serve" / "tokens.json").read_text()  # stored hashed
    assert main(["token", "revoke", str(model), token.split("_")[1][:6]]) == 0
    error_of(get(client, "/v1/me", token), 401)
    assert get(client, "/v1/me", tok[other]).status_code == 200  # the others stay valid
    assert main(["token", "revoke", str(model), "zzzz"]) == 2  # unknown id: one line, exit 2
    assert main(["token", "create", str(model), "--user", "999999"]) == 2


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/users/{other}/recommendations?k=0", None, 422),
    ("GET", "/v1/users/{other}/recommendations?k=-3", None, 422),
    ("GET", "/v1/users/{other}/recommendations?k=100000", None, 422),
    ("GET", "/v1/users/{other}/recommendations?k=ten", None, 422),
    ("GET", "/v1/users/abc/recommendations", None, 422),
    ("GET", "/v1/users/999999/recommendations", None, 404),
    ("GET", "/v1/users/-1/history", None, 404),
    ("POST", "/v1/score", b'{"pairs": [', 422),
    ("POST", "/v1/score", b'{"pairs": []}', 422),
    ("POST", "/v1/score", b'{"pairs": [{"user": 1}]}', 422),
    ("POST", "/v1/score", b'{"pairs": [{"user": 1, "item": 1, "x": 2}]}', 422),
    ("POST", "/v1/score", b'[1, 2]', 422),
    ("POST", "/v1/score", b'{"pairs": [{"user": 1, "item": 99999}]}', 404),
    ("POST", "/v1/score", b'{"pairs": [{"user": 99999, "item": 1}]}', 404),
    ("POST", "/v1/score", json.dumps({"pairs": [{"user": 1, "item": 1}] * (MAX_BATCH + 1)}).encode(), 422),
    ("POST", "/v1/score", b'{"pairs": "' + b"x" * 70000 + b'"}', 413),
    ("POST", "/v1/users/999999/forget", None, 404),
    ("GET", "/v1/requests/r9999", None, 404),
    ("GET", "/v1/requests/r9999/certificate", None, 404),
    ("GET", "/v1/nothing", None, 404),
    ("DELETE", "/v1/score", None, 405),
])
def test_bad_input_is_a_4xx_with_an_error_body(live, method, path, body, status):
    client, tok, victim, other, model = live
    r = client.request(method, path.format(other=other), headers={**bearer(tok["admin"]),
                                                                  "Content-Type": "application/json"}, content=body)
    error_of(r, status)


def test_healthz_openapi_and_page(live):
    client = live[0]
    assert client.get("/healthz").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/users/{user}/recommendations", "/v1/score", "/v1/users/{user}/forget", "/v1/requests/{rid}",
            "/v1/requests/{rid}/certificate", "/metrics", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "Delete my data" in page.text


def test_deletions_are_refused_at_once_applied_in_order_and_certified_as_by_the_cli(served_model, tmp_path):
    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    second = next(u for u in range(1, 50) if u != victim)
    bystander = next(u for u in range(1, 50) if u not in (victim, second))
    tok = tokens(model, victim, second, bystander)
    service = Service(model, candidates=10, store_k=5)
    with TestClient(create_app(service)) as client:
        assert service.precompute_now(users=[victim, second, bystander]) == 3
        stored = json.loads((model / "serve" / STORE_FILE).read_text())
        assert str(victim) in stored["users"] and str(bystander) in stored["users"]
        r = get(client, f"/v1/users/{bystander}/recommendations?k=3", tok[bystander])
        assert r.json()["source"] == "store"
        assert r.json()["items"] == stored["users"][str(bystander)][:3]
        before = get(client, f"/v1/users/{bystander}/recommendations?k=3", tok[bystander]).json()["items"]

        # two requests accepted before the worker runs: queued in the ledger, refused at once (410), purged
        first = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim]))
        assert first.status_code == 202 and first.json()["status"] == "pending", first.text
        again = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim]))
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]  # idempotent
        r1 = first.json()["id"]
        r2 = client.post(f"/v1/users/{second}/forget", headers=bearer(tok["admin"])).json()["id"]
        assert r1 != r2
        for u in (victim, second):
            error_of(get(client, f"/v1/users/{u}/recommendations", tok[u]), 410)
            error_of(get(client, f"/v1/users/{u}/history", tok[u]), 410)
            error_of(client.post("/v1/score", headers=bearer(tok[u]), json={"pairs": [{"user": u, "item": 1}]}),
                     410)
        assert str(victim) not in json.loads((model / "serve" / STORE_FILE).read_text())["users"]
        error_of(get(client, f"/v1/requests/{r1}", tok[second]), 404)  # as a missing one: nothing to count
        error_of(get(client, f"/v1/requests/{r1}/certificate", tok[victim]), 409)  # not done yet

        service.start()
        done = wait_done(lambda p: get(client, p, tok[victim]), r1)
        assert [e["status"] for e in done["history"]] == ["pending", "retrained", "installed", "done"]
        wait_done(lambda p: get(client, p, tok["admin"]), r2)
        cert = get(client, f"/v1/requests/{r1}/certificate", tok[victim])
        assert cert.status_code == 200 and "attachment" in cert.headers["content-disposition"]
        certs = [cert.json(), get(client, f"/v1/requests/{r2}/certificate", tok["admin"]).json()]
        after = get(client, f"/v1/users/{bystander}/recommendations?k=3", tok[bystander]).json()
        error_of(get(client, f"/v1/users/{victim}/recommendations", tok[victim]), 410)
    service.close()
    assert certs[0]["body"]["affected_shards"] == [0] and certs[0]["body"]["adapters"][0]["retrained"]
    assert certs[1]["body"]["adapters"][0]["before"] == certs[0]["body"]["adapters"][0]["after"]  # replanned
    assert after["source"] == "online" and len(after["items"]) == 3  # the store was made with the old adapters
    assert str(victim) not in json.loads((model / "serve" / STORE_FILE).read_text())["users"]
    assert before

    # the same two requests through privrec forget, one after the other: the same certificate bodies
    cli = copy_model(served_model, tmp_path / "cli")
    reference = [run_forget(cli, users=[victim], progress=False), run_forget(cli, users=[second], progress=False)]
    for got, want in zip(certs, reference):
        assert certificate_body(got) == certificate_body(want)
    assert main(["forget", str(model), "--verify"]) == 0


def test_blended_order():
    import numpy as np

    scores = np.array([0.1, 0.9, 0.5])
    assert blended_order(scores, 0.0).tolist() == [1, 2, 0]  # the LLM's order
    assert blended_order(scores, 1.0).tolist() == [0, 1, 2]  # the candidate list's order
    assert blended_order(scores, 0.5).tolist() == [1, 0, 2]  # (1, .5), (0, 1)... keys 1.0, 0.5, 1.5 -> ties by index


def test_recommender_refuses_a_forgotten_user_and_cli_flags(served_model, tmp_path, capsys):
    model = copy_model(served_model, tmp_path / "m")
    assert main(["recommend", str(model), "--user", "3", "--top", "2", "--candidates", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    with pytest.raises(SystemExit) as e:  # argparse: mutually exclusive
        main(["recommend", str(model), "--user", "3", "--candidates", "8", "--max-candidates", "3"])
    assert e.value.code == 2
    rec = Recommender(model)
    assert len(rec.candidates(3, rec.history(3)[1], 8, None)) == 8
    seen = rec.history(3)[1]  # the default source is popularity's order; B = 1 serves it as it is
    assert rec.candidates(3, seen, 8, None) == [i for i in rec.generator.by_popularity if i not in seen][:8]
    top = [r["item_id"] for r in rec.recommend(3, 4, two_stage=8, blend=1.0)]
    assert top == rec.candidates(3, seen, 8, None)[:4]
    assert main(["recommend", str(model), "--user", "3", "--candidates", "8", "--candidate-source", "nope"]) == 2
    assert "--candidate-source must be one of" in capsys.readouterr().err


def test_a_request_is_done_only_once_its_new_adapters_serve(served_model, tmp_path, monkeypatch):
    """The ledger says done before the service has built the recommender on the new adapters; until that one
    serves, the request reads as installed (no certificate link), and the first answer after done comes from
    the new adapters (online: the store was made with the old ones), never from the old store."""
    import threading

    from privrec.unlearning.exact.ledger import Ledger

    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    bystander = next(u for u in range(1, 50) if u != victim)
    tok = tokens(model, victim, bystander)
    service = Service(model, candidates=10, store_k=5, precompute=False)
    release, building = threading.Event(), threading.Event()
    real_build = service._build

    def slow_build():
        building.set()
        assert release.wait(120)
        return real_build()

    monkeypatch.setattr(service, "_build", slow_build)
    with TestClient(create_app(service)) as client:
        service.precompute_now(users=[bystander])
        assert get(client, f"/v1/users/{bystander}/recommendations?k=3", tok[bystander]).json()["source"] == "store"
        rid = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim])).json()["id"]
        service.start()
        assert building.wait(300)  # the ledger has the request done; the old recommender still serves
        assert Ledger(model / "ledger.sqlite", create=False).request(rid)["status"] == "done"
        seen = get(client, f"/v1/requests/{rid}", tok[victim]).json()
        assert seen["status"] == "installed" and seen["certificate"] is None
        assert "done" not in [e["status"] for e in seen["history"]]
        error_of(get(client, f"/v1/requests/{rid}/certificate", tok[victim]), 409)
        release.set()
        wait_done(lambda p: get(client, p, tok[victim]), rid)
        assert get(client, f"/v1/users/{bystander}/recommendations?k=3", tok[bystander]).json()["source"] == "online"
    service.close()


def test_an_online_answer_is_kept_in_the_store_and_a_half_filled_store_is_continued(served_model, tmp_path,
                                                                                     monkeypatch):
    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    asked, other = [u for u in range(1, 50) if u != victim][:2]
    tok = tokens(model, victim, asked)
    calls = []
    real = Recommender.recommend

    def counted(self, user, *a, **kw):
        calls.append(user)
        return real(self, user, *a, **kw)

    monkeypatch.setattr(Recommender, "recommend", counted)
    service = Service(model, candidates=10, store_k=5, precompute=True)  # never started: no worker
    with TestClient(create_app(service)) as client:
        first = get(client, f"/v1/users/{asked}/recommendations?k=3", tok[asked]).json()
        again = get(client, f"/v1/users/{asked}/recommendations?k=5", tok[asked]).json()
        assert (first["source"], again["source"]) == ("online", "store")  # its top store_k kept, k=5 from it
        assert again["items"][:3] == first["items"] and calls == [asked]
        assert service.precompute_now(users=[asked, other]) == 2 and calls == [asked, other]  # asked: not again
        stored = json.loads((model / "serve" / STORE_FILE).read_text())
        assert set(stored["users"]) == {str(asked), str(other)} and stored["key"] == service._key()
        # an accepted deletion refuses the user before it purges: an answer computed before cannot come back
        client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim]))
        assert service.store.add(service._key(), 5, {victim: again["items"]}, service.forgotten.__contains__) == 0
    service.close()
    restarted = Service(model, candidates=10, store_k=5, precompute=True)
    assert set(restarted.store.users) == {asked, other}  # continued after a restart, nothing computed twice
    assert restarted.precompute_now(users=[asked, other]) == 2 and calls == [asked, other]
    restarted.close()


def four_users(served_model, tmp_path, monkeypatch):
    """A copy of the model whose service sees four users: the victim and three others, the first of whom has
    training samples too (forgetting them changes the adapters) and the last the user who asks (tokens for the
    victim, the asker and an admin)."""
    from privrec.model.adapters import read_meta

    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    trained = sorted({int(i.split("-")[0][1:]) for i in read_meta(model / "adapters" / "default")["sample_ids"]})
    first = next(u for u in trained if u != victim)
    others = [first] + [u for u in range(1, 50) if u not in (victim, first)][:2]
    asked = others[-1]
    monkeypatch.setattr(Recommender, "users", lambda self: [u for u in [*others, victim] if u not in
                                                            self.md.deleted_by])
    return model, victim, others, asked, tokens(model, victim, asked)


def test_after_a_deletion_the_store_is_begun_again_and_filled_the_users_asked_for_first(served_model, tmp_path,
                                                                                        monkeypatch):
    model, victim, others, asked, tok = four_users(served_model, tmp_path, monkeypatch)
    service = Service(model, candidates=10, store_k=5, precompute=True, refill_before_swap=False)  # --swap-at-once
    filled = []
    real_add = service.store.add

    def add(key, k, users, refused, **kw):
        filled.extend((key["adapters"], u) for u in users)
        return real_add(key, k, users, refused, **kw)

    monkeypatch.setattr(service.store, "add", add)
    with TestClient(create_app(service)) as client:
        assert service.precompute_now() == 4
        old = json.loads((model / "serve" / STORE_FILE).read_text())
        assert get(client, f"/v1/users/{asked}/recommendations?k=3", tok[asked]).json()["source"] == "store"
        rid = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim])).json()["id"]
        filled.clear()
        service.start()
        wait_done(lambda p: get(client, p, tok[victim]), rid)
        deadline = time.monotonic() + 120
        while service._store_stale and time.monotonic() < deadline:
            time.sleep(0.05)
        new_digest = service.rec.digest
        status = get(client, "/metrics", tok["admin"]).json()["store"]
    service.close()
    assert status == {"precompute": True, "current": True, "users": 3, "servable": 3, "skipped": 0}
    new = json.loads((model / "serve" / STORE_FILE).read_text())
    assert new_digest != old["key"]["adapters"] and new["key"]["adapters"] == new_digest
    assert set(new["users"]) == {str(u) for u in others}  # nothing made with the old adapters survives
    assert all(d == new_digest for d, _ in filled) and [u for _, u in filled][0] == asked  # asked-for first
    assert sorted(u for _, u in filled) == sorted(others)


def hold_refill(monkeypatch, first_digest):
    """Record every recommendation computed under adapters other than `first_digest` (a fill of the next store)
    as (n, user), n counting the adapters in the order they appear (1 = the first new ones), and hold the fill
    at its second user until `release` is set (`held` tells it got there)."""
    import threading

    digests, fills = [first_digest], []
    held, release = threading.Event(), threading.Event()
    real = Recommender.recommend

    def gated(self, user, *a, **kw):
        if self.digest not in digests:
            digests.append(self.digest)
        if self.digest != first_digest:
            fills.append((digests.index(self.digest), user))
            if len(fills) == 2:
                held.set()
                assert release.wait(120)
        return real(self, user, *a, **kw)

    monkeypatch.setattr(Recommender, "recommend", gated)
    return held, release, fills, digests


def test_by_default_the_store_is_filled_under_the_new_adapters_before_they_are_swapped_in(served_model, tmp_path,
                                                                                         monkeypatch):
    """No user is answered online for a deletion: while the new adapters' store fills (held here after its first
    user), the old adapters answer from their store and the request reads installed; the swap adopts the new
    store whole, so every answer after it comes from the store, made with the new adapters."""
    model, victim, others, asked, tok = four_users(served_model, tmp_path, monkeypatch)
    service = Service(model, candidates=10, store_k=5, precompute=True)
    old_digest = service.rec.digest
    held, release, fills, _ = hold_refill(monkeypatch, old_digest)
    with TestClient(create_app(service)) as client:
        assert service.precompute_now() == 4
        before = get(client, f"/v1/users/{asked}/recommendations?k=3", tok[asked]).json()
        assert before["source"] == "store"
        rid = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim])).json()["id"]
        service.start()
        assert held.wait(300)  # retrained, certified, one user filled under the new adapters, not swapped in
        assert get(client, f"/v1/requests/{rid}", tok[victim]).json()["status"] == "installed"
        during = get(client, f"/v1/users/{asked}/recommendations?k=3", tok[asked]).json()
        assert during == before  # the old adapters' store still answers, nothing computed online
        error_of(get(client, f"/v1/users/{victim}/recommendations", tok[victim]), 410)
        nxt = service.next_store  # its file is written every few seconds (and at the end)
        assert nxt.key["adapters"] != old_digest and set(nxt.users) == {asked} and nxt.path.is_file()
        store = get(client, "/metrics", tok["admin"]).json()["store"]
        assert store["next_users"] == 1 and store["users"] == 3  # the old store: the victim purged
        release.set()
        wait_done(lambda p: get(client, p, tok[victim]), rid)
        after = {u: get(client, f"/v1/users/{u}/recommendations?k=5", tok["admin"]).json() for u in others}
        new_digest = service.rec.digest
        assert not service._store_stale and "next_users" not in service.store_status()
    service.close()
    new_calls = [u for n, u in fills if n == 1]  # the new adapters' recommender, filling the next store
    assert new_digest != old_digest and len(new_calls) == len(fills) and new_calls[0] == asked  # asked-for first
    assert sorted(new_calls) == sorted(others)  # each computed once, under the new adapters, before the swap
    assert all(a["source"] == "store" for a in after.values())
    saved = json.loads((model / "serve" / STORE_FILE).read_text())
    assert saved["key"]["adapters"] == new_digest and set(saved["users"]) == {str(u) for u in others}
    assert not (model / "serve" / NEXT_FILE).exists()
    fresh = Recommender(model, pending_ok=True).recommend(asked, 5, two_stage=10, blend=0.0, source="popularity")
    assert after[asked]["items"] == fresh  # what the new adapters recommend, not the old store's


def test_a_store_half_filled_under_new_adapters_is_taken_up_by_a_restarted_service(served_model, tmp_path):
    """A service killed while it filled the next store (its adapters already on disk) continues that store when
    started again; one made under other adapters is removed, never served."""
    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    kept, other = [u for u in range(1, 50) if u != victim][:2]
    run_forget(model, users=[victim], progress=False)  # the new adapters on disk, as after the kill
    probe = Service(model, candidates=10, store_k=5)
    key, items = probe._key(), probe.rec.recommend(kept, 5, two_stage=10, blend=0.0, source="popularity")
    probe.close()
    nxt = RecStore(model, NEXT_FILE)
    nxt.begin(key, 5)
    nxt.add(key, 5, {kept: items}, lambda u: False, flush=True)
    service = Service(model, candidates=10, store_k=5, precompute=True)
    assert service.store.get(kept, 5, key) == items and service.store.get(other, 5, key) is None
    assert not nxt.path.exists() and json.loads(service.store.path.read_text())["key"] == key
    service.close()
    stale = RecStore(model, NEXT_FILE)
    stale.begin({**key, "adapters": "not-these"}, 5)
    stale.add(stale.key, 5, {other: items}, lambda u: False, flush=True)
    service = Service(model, candidates=10, store_k=5, precompute=True)
    assert service.store.get(other, 5, key) is None and not stale.path.exists()
    service.close()


def test_a_deletion_arriving_during_the_refill_ends_it_and_the_swap_happens_at_once(served_model, tmp_path,
                                                                                    monkeypatch):
    """A burst of requests never holds the old adapters in service: the second request, accepted while the
    first one's store fills, ends that fill (the swap takes the users filled so far) and is applied next; its
    own fill then covers the users left."""
    model, victim, others, asked, tok = four_users(served_model, tmp_path, monkeypatch)
    second = others[0]
    service = Service(model, candidates=10, store_k=5, precompute=True)
    held, release, fills, digests = hold_refill(monkeypatch, service.rec.digest)
    with TestClient(create_app(service)) as client:
        assert service.precompute_now() == 4
        first = client.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim])).json()["id"]
        service.start()
        assert held.wait(300)  # the first request's fill, at its second user
        then = client.post(f"/v1/users/{second}/forget", headers=bearer(tok["admin"])).json()["id"]
        release.set()
        for rid in (first, then):
            wait_done(lambda p: get(client, p, tok["admin"]), rid)
        deadline = time.monotonic() + 120
        while service._store_stale and time.monotonic() < deadline:
            time.sleep(0.05)
        final = service.rec.digest
        status = service.store_status()
    service.close()
    first_fill = [u for n, u in fills if n == 1]
    assert len(first_fill) == 2  # ended after the user it was computing
    assert {u for n, u in fills if n == 2} == set(others) - {second}  # the second request's adapters: the rest
    assert len(digests) == 3 and final == digests[2]
    assert status == {"precompute": True, "current": True, "users": 2, "servable": 2, "skipped": 0}
    saved = json.loads((model / "serve" / STORE_FILE).read_text())
    assert saved["key"]["adapters"] == final and set(saved["users"]) == {str(u) for u in others if u != second}


def test_a_model_that_cannot_forget_says_so_and_takes_no_deletion_request(served_model, tmp_path, live):
    """The service of a model that cannot forget exactly says so (its /healthz and /v1/me, read by the page to
    hide the button); a deletion request answers 409 with a line for the person who asked, not the operator's."""
    client, tok, victim = live[0], live[1], live[2]
    assert get(client, "/v1/me", tok[victim]).json()["forgets_by"] == "retrain-all"
    health = client.get("/healthz").json()
    assert health["forgets_by"] == "retrain-all" and health["cannot_forget"] is None

    model = copy_model(served_model, tmp_path / "model")
    manifest = json.loads((model / MANIFEST_FILE).read_text())
    manifest["forget"] = []  # as a model of a kind that cannot forget records it
    (model / MANIFEST_FILE).write_text(json.dumps(manifest))
    tok = tokens(model, victim)
    service = Service(model, candidates=20)
    try:
        with TestClient(create_app(service)) as c:
            assert get(c, "/v1/me", tok[victim]).json()["forgets_by"] is None
            health = c.get("/healthz").json()
            assert health["forgets_by"] is None and "cannot forget exactly" in health["cannot_forget"]
            said = error_of(c.post(f"/v1/users/{victim}/forget", headers=bearer(tok[victim])), 409)
            assert "ask the service's operator" in said and "privrec" not in said
            assert not (model / LEDGER_FILE).exists()  # nothing recorded
            assert get(c, f"/v1/users/{victim}/history", tok[victim]).status_code == 200  # not refused as gone
    finally:
        service.close()
