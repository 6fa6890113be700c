"""Features with lineage on the clients kind (METHODS §10, §12; issue 35): each client's prompts show features
counted over its own data alone (its users' share of the training pool), so no label crosses clients; each client
adapter records what its clients' features were counted over; forgetting a user recomputes only their client's
features (bit-identical to training without them), inference shows features counted over the data that remains,
and a record that does not match the data fails verification and is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec import models
from privrec.errors import ConfigError
from privrec.features import features_digest
from privrec.federated.client import FederatedClient, client_features, features_record
from privrec.federated.runner import build_model, plan_federation, run_federate
from privrec.federated.slicing import checkpoint_features, stage_pool
from privrec.model.adapters import read_adapter, read_meta
from privrec.prepare import setup_data
from privrec.unlearning.exact.forget import resolve_interactions

PROMPT = {"item_stats": True, "cf_score": True}
COLLAB = {"epochs": 10}


def _cfg(strategy: str):
    # LoRA on the top layer over the frozen-layer cache: a deletion must purge the prompts the old features showed
    return fed_config(prompt=PROMPT, collab=COLLAB, lora={"top_layers": 1, "cache_frozen": True},
                      federated={"strategy": strategy})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fedfeatures")
    out = {}
    for strategy in ("mixture", "fedavg"):
        cfg = _cfg(strategy)
        out[strategy] = (cfg, run_federate(cfg, base / strategy, progress=False), base / strategy)
    return out


def _metas(run) -> dict[int, dict]:
    return {int(a.name.split("-")[1]): read_meta(run / a.path) for a in models.load(run).adapters}


def test_each_client_shows_features_counted_over_its_own_samples_only(runs):
    cfg, m, run = runs["mixture"]
    fed = plan_federation(cfg)
    metas = _metas(run)
    for c, meta in metas.items():
        counted = fed.counted(c)
        assert meta["features"] == features_record(cfg, {c: counted})
        assert meta["features"]["uses"] == ["prompt.item_stats", "prompt.cf_score"]
        # its users' share of the pool: more than its drawn samples, and only its own users'
        assert {s.user_id for s in counted} <= {u for u, cc in fed.assignment.items() if cc == c}
        assert {s.sample_id for s in fed.samples(c)[0]} < {s.sample_id for s in counted}
    assert len({json.dumps(meta["features"]["clients"]) for meta in metas.values()}) == len(metas)
    # a client's prompts read its own counts: no other client's sample is among what they count
    model = build_model(cfg, fed.splits)
    client = FederatedClient(0, model, *fed.samples(0), cfg, counted=fed.counted(0))
    stats, collab = client.features
    own_ids = {s.sample_id for s in fed.counted(0)}
    assert stats.members == own_ids and set(collab.fold_of) == own_ids
    # and they differ from the prompts the pooled counts would give (the feature is in the text)
    pooled = client_features(cfg, fed.splits.train)
    with model.features_of(pooled):
        assert [e.key for e in model.encode(fed.samples(0)[0])] != [e.key for e in client.items["train"]]
    # an adapter that mixed every client's weights records each contributor's features, each its own
    cfg_avg, _, run_avg = runs["fedavg"]
    for meta in _metas(run_avg).values():
        assert meta["features"] == features_record(cfg_avg, {c: fed.counted(c) for c in fed.clients})
    # served: a user's prompts show their own client's features
    from privrec.recommender import Recommender

    scorer = Recommender(run_avg, progress=False).scorer
    user = fed.samples(2)[0][0].user_id
    assert features_digest(*scorer.model_for(user).features) == features_digest(*client_features(cfg_avg,
                                                                                                  fed.counted(2)))


def test_forgetting_a_user_recomputes_only_their_clients_features(runs, tmp_path, capsys):
    from privrec.commands import forget
    from privrec.recommender import Recommender

    cfg, _, src = runs["mixture"]
    run = tmp_path / "m"
    shutil.copytree(src, run)
    before = _metas(run)
    user = int(before[0]["sample_ids"][0].split("-")[0][1:])
    client = models.load(run).clients[user]
    # the client's prompts as it showed them, scored once so the frozen-layer cache holds them
    old_fed = plan_federation(cfg)
    model = build_model(cfg, old_fed.splits)
    client_view = FederatedClient(client, model, *old_fed.samples(client), cfg, counted=old_fed.counted(client))
    shown = [e.key for items in client_view.items.values() for e in items]
    for items in client_view.items.values():
        model.score(items, 8, progress=False)
    assert all(model.cache.entry(k) is not None for k in shown)
    cert = forget.run_forget(run, users=[user], progress=False)
    assert cert["body"]["affected_shards"] == [client]
    after = _metas(run)
    tomb = {(u, i) for u, i, _ in resolve_interactions(plan_federation(cfg).splits.dataset, [user])}
    remaining = plan_federation(cfg, setup_data(cfg, frozenset(tomb)), dict(models.load(src).clients))
    for c, meta in after.items():
        assert not any(i.startswith(f"u{user}-") for i in meta["sample_ids"])
        assert meta["features"] == features_record(cfg, {c: remaining.counted(c)})
        if c != client:
            assert meta["features"] == before[c]["features"] and meta["tensors_sha256"] == before[c]["tensors_sha256"]
    assert after[client]["features"] != before[client]["features"]
    # no prompt that showed the old features stays cached (the retrain caches its new prompts, which may repeat
    # an old one word for word: an item the user never rated, whose counted line did not change)
    now = {e.key for items in FederatedClient(client, model, *remaining.samples(client), cfg,
                                              counted=remaining.counted(client)).items.values() for e in items}
    model.cache.mem.clear()
    stale = set(shown) - now
    assert stale and not any(model.cache.entry(k) is not None for k in stale)
    # bit-identical to a federation trained from scratch without the user (same clients)
    run_federate(cfg, tmp_path / "fresh", progress=False, tombstones=frozenset(tomb),
                 assignment=dict(models.load(src).clients))
    assert _metas(tmp_path / "fresh")[client]["tensors_sha256"] == after[client]["tensors_sha256"]
    assert _metas(tmp_path / "fresh")[client]["features"] == after[client]["features"]
    # inference: a user of that client is scored under features counted over what remains of the client
    other = next(u for u, c in models.load(run).clients.items() if c == client and u != user)
    scorer = Recommender(run, progress=False).scorer
    expected = client_features(cfg, remaining.counted(client))
    stats, _ = scorer.features(client)
    assert features_digest(*scorer.features(client)) == features_digest(*expected)
    assert not any(i.startswith(f"u{user}-") for i in stats.members)
    probe = [s for s in remaining.splits.test if models.load(run).clients[s.user_id] == client][:3]
    with scorer.model.features_of(expected):
        assert [e.key for e in scorer.encode(client, probe)] == [e.key for e in scorer.model.encode(probe)]
    assert forget.run_verify(run)["ok"]
    # a record that is not what the lineage gives fails verification in one line, and a model whose adapter
    # does not record its features is refused
    path = run / "adapters" / f"client-{client}" / "privrec.json"
    meta = json.loads(path.read_text())
    meta["features"]["clients"][str(client)]["digest"] = "0" * 64
    path.write_text(json.dumps(meta))
    code, text, err = run_cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "features" in text + err
    del meta["features"]
    path.write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "forget", str(run), "--users", str(other))
    assert code == 2 and "record what they were counted over" in err and "Traceback" not in err


def test_a_user_only_the_features_counted_retrains_their_client(runs, tmp_path):
    """A user on a client with no drawn training sample, whose labels only the client's features counted (its
    share of the pool): forgetting them retrains their client, and only it, without their labels."""
    from privrec.commands import forget

    cfg, _, src = runs["mixture"]
    run = tmp_path / "m"
    shutil.copytree(src, run)
    fed = plan_federation(cfg, None, dict(models.load(src).clients))
    drawn = {s.user_id for s in fed.splits.train}
    user, client = next((u, c) for u, c in sorted(fed.assignment.items())
                        if u not in drawn and any(s.user_id == u for s in fed.counted(c)))
    before = _metas(run)
    cert = forget.run_forget(run, users=[user], progress=False)
    assert cert["body"]["affected_shards"] == [client]
    after = _metas(run)
    assert {c for c in after if after[c]["tensors_sha256"] != before[c]["tensors_sha256"]} == {client}
    assert after[client]["sample_ids"] == before[client]["sample_ids"]  # it trained on none of theirs
    tomb = frozenset((u, i) for u, i, _ in resolve_interactions(fed.splits.dataset, [user]))
    remaining = plan_federation(cfg, setup_data(cfg, tomb), dict(models.load(src).clients))
    assert after[client]["features"] == features_record(cfg, {client: remaining.counted(client)})
    assert not any(s.user_id == user for s in remaining.counted(client))
    assert forget.run_verify(run)["ok"]


def test_federate_refuses_what_clients_cannot_count_apart():
    with pytest.raises(ConfigError, match="collab.inject"):
        fed_config(collab={"inject": True}, federated={"strategy": "mixture"})


# --- sliced clients (federated.slices, METHODS §9): a stage counts over the users of the slices it has seen ------
R, ROUNDS = 3, 3


def _sliced_cfg():
    return fed_config(prompt=PROMPT, collab=COLLAB, model={"precision": "fp32"}, data={"n_train": 120},
                      lora={"top_layers": 1, "cache_frozen": True},
                      federated={"strategy": "mixture", "rounds": ROUNDS, "slices": R})


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    base = tmp_path_factory.mktemp("fedslicedfeatures")
    cfg = _sliced_cfg()
    run_federate(cfg, base / "run", progress=False)
    return cfg, base / "run"


def _ckpt(run, c: int, s: int):
    return run / "slices" / f"client-{c}" / f"stage-{s}"


def _ckpt_bytes(run) -> dict[str, bytes]:
    return {str(p.relative_to(run / "slices")): p.read_bytes() for p in sorted((run / "slices").rglob("*.safetensors"))}


def _scratch(cfg, client: int, slices, tomb, assignment) -> dict:
    """Sliced training of ``client`` from the run's initial adapter on the data that remains (same slice map)."""
    from privrec.model.adapters import adapter_state

    fed = plan_federation(cfg, setup_data(cfg, frozenset(tomb)), assignment)
    keep = fed.samples(client)[0]
    ids = {s.sample_id for s in keep}
    model = build_model(cfg, fed.splits)
    state, _ = FederatedClient(client, model, keep, [], [], cfg, slices=[[i for i in sl if i in ids] for sl in slices],
                               counted=fed.counted(client)).train_alone(adapter_state(model.model))
    return state


def test_a_sliced_clients_rounds_show_features_counted_over_the_slices_they_have_seen(sliced):
    cfg, run = sliced
    fed = plan_federation(cfg, None, dict(models.load(run).clients))
    for c, meta in _metas(run).items():
        train, counted = fed.samples(c)[0], fed.counted(c)
        assert meta["features"] == features_record(cfg, {c: counted})  # the last stage and scoring: all of it
        users = [{s.user_id for s in train if s.sample_id in set(sl)} for sl in meta["slices"]]
        for s in range(1, R):
            pool = stage_pool(counted, train, meta["slices"], s)
            assert {x.user_id for x in pool} == set().union(*users[:s]) & {x.user_id for x in counted}
            assert read_meta(_ckpt(run, c, s))["features"] == checkpoint_features(cfg, c, pool, s)
            assert len(pool) < len(counted)  # the later slices' users and the pool-only users are not counted yet
    # round 1 renders its prompts under stage 1's features, not the client's
    model = build_model(cfg, fed.splits)
    client = FederatedClient(0, model, *fed.samples(0), cfg, counted=fed.counted(0))
    first = client.round_items(0)
    with model.features_of(client_features(cfg, client.stage_counted(1))):
        assert [e.key for e in first] == [e.key for e in model.encode(slicing_in(client, 1))]
    whole = {s.sample_id: e.key for s, e in zip(client.samples["train"], client.items["train"])}
    assert [e.key for e in first] != [whole[s.sample_id] for s in slicing_in(client, 1)]
    assert client.round_items(ROUNDS - 1) == client.items["train"]


def slicing_in(client: FederatedClient, s: int):
    from privrec.federated.slicing import in_slices

    return in_slices(client.samples["train"], client.slices, s)


def test_forgetting_in_a_sliced_client_replays_from_the_first_stage_that_counted_the_user(sliced, tmp_path, capsys):
    from privrec.commands import forget

    cfg, src = sliced
    assignment = dict(models.load(src).clients)
    fed = plan_federation(cfg, None, assignment)
    drawn = {s.user_id for s in fed.splits.train}
    for case in ("slice-2", "pool-only"):
        run = tmp_path / case
        shutil.copytree(src, run)
        before, ckpts = _metas(run), _ckpt_bytes(run)
        if case == "slice-2":
            client = 1
            user = int(before[client]["slices"][1][0].split("-")[0][1:])
            first = 2
        else:  # in the client's share of the pool only: no slice holds them, the last stage alone counted them
            user, client = next((u, c) for u, c in sorted(assignment.items())
                                if u not in drawn and any(s.user_id == u for s in fed.counted(c)))
            first = R
        # every stage's prompts as the client showed them, scored once so the frozen-layer cache holds them
        model = build_model(cfg, fed.splits)
        view = FederatedClient(client, model, *fed.samples(client), cfg, counted=fed.counted(client))
        shown = {e.key for items in view.training_items() for e in items}
        for items in view.training_items():
            model.score(items, 8, progress=False)
        cert = forget.run_forget(run, users=[user], progress=False)
        [row] = [a for a in cert["body"]["adapters"] if a["shard"] == client]
        assert cert["body"]["affected_shards"] == [client], case
        assert row["slices"]["restored"] == f"stage-{first - 1}", case
        after = _metas(run)
        assert {c for c in after if after[c]["tensors_sha256"] != before[c]["tensors_sha256"]} == {client}, case
        tomb = {(u, i) for u, i, _ in resolve_interactions(fed.splits.dataset, [user])}
        got, want = read_adapter(run / "adapters" / f"client-{client}")[0], _scratch(
            cfg, client, before[client]["slices"], tomb, assignment)
        # as training from scratch on what remains, to fp32 rounding: the purge drops cached prompts of the stages
        # before as well, and their frozen states computed again in other batches differ in the last bits (as
        # test_features_lineage's sliced shards); the change itself is orders of magnitude larger
        old_state = read_adapter(src / "adapters" / f"client-{client}")[0]
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), case
        assert max(float((old_state[k] - got[k]).abs().max()) for k in got) > 1e-4, case
        now = _ckpt_bytes(run)
        for name, data in ckpts.items():  # stages before the first one the user reached are kept byte for byte
            c, s = int(name.split("/")[0].split("-")[1]), int(name.split("/")[1].split("-")[1])
            assert (now[name] == data) == (c != client or s < first), (case, name)
        remaining = plan_federation(cfg, setup_data(cfg, frozenset(tomb)), assignment)
        train, counted = remaining.samples(client)[0], remaining.counted(client)
        # no stage's prompt that showed the user's labels stays cached (the replay caches its own prompts)
        now = {e.key for items in FederatedClient(client, model, train, [], [], cfg, slices=after[client]["slices"],
                                                  counted=counted).training_items() for e in items}
        model.cache.mem.clear()
        stale = shown - now
        assert stale and not any(model.cache.entry(k) is not None for k in stale), case
        for s in range(1, R):  # every checkpoint's record recounts from what remains: the user counted nowhere
            pool = stage_pool(counted, train, after[client]["slices"], s)
            assert not any(x.user_id == user for x in pool)
            assert read_meta(_ckpt(run, client, s))["features"] == checkpoint_features(cfg, client, pool, s)
        assert forget.run_verify(run)["ok"], case
    # a checkpoint whose features record is not what its stage's data gives fails --verify in one line
    path = _ckpt(run, client, 1) / "privrec.json"
    meta = json.loads(path.read_text())
    meta["features"]["clients"][str(client)]["lineage_sha256"] = "0" * 64
    path.write_text(json.dumps(meta))
    code, text, err = run_cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "stage-1" in text + err and "features" in text + err and "Traceback" not in err
