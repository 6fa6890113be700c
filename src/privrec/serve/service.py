"""The state of ``privrec serve MODEL`` (METHODS §11), independent of HTTP.

- The service holds the model directory's run lock for its whole life (no other privrec command changes
  the model under it) and serves one :class:`~privrec.recommender.Recommender` (the same code as
  ``privrec recommend``: two stages, popularity + MF candidates re-ranked by P(Yes)).
- ``forget(user)`` records a deletion request in the model's ledger with ``privrec forget``'s own engine
  (:func:`~privrec.unlearning.exact.forget.submit_forget`: tombstones, removed samples and the adapters' state in one
  SQLite transaction, ``synchronous=FULL``) and only then returns its id; from that moment the user is
  refused (410) and their stored recommendations are purged. Asking again returns the same request.
- One worker thread applies the ledger's unfinished requests in order with
  :func:`~privrec.unlearning.exact.forget.run_resume` (retrain, swap, certify: the CLI's procedure, so a request the
  service was killed in is finished by the next start, or by ``privrec forget MODEL --resume``). After each
  one it builds a new recommender off to the side and swaps the reference under a lock: requests in flight
  finish on the old one, none is dropped.
- With ``precompute``, the worker fills a second store under a deletion's new adapters before it swaps them in
  (the old adapters and their store answer meanwhile: no user is answered online for a deletion), and the swap
  adopts it; a new deletion request arriving during that fill ends it early and the swap happens at once.
  With ``refill_before_swap=False`` (``--swap-at-once``) the store is begun again empty at the swap and filled
  user by user, the users asked for most recently first, answering online meanwhile; an online answer is kept
  in it too.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from privrec import models
from privrec.config import ExecutorConfig
from privrec.errors import NotFoundError, RunError, UserError
from privrec.executor import open_executor
from privrec.federated.forget import ROUTES
from privrec.prepare import source_data
from privrec.progress import track
from privrec.recommender import Recommender
from privrec.rundir import CERTIFICATES_DIR, LEDGER_FILE, read_json, run_lock
from privrec.serve.approximate import (
    ApproximateLog,
    approximate_recommender,
    check_approximate,
    influence_states,
    served_models,
)
from privrec.serve.auth import TokenStore
from privrec.serve.store import NEXT_FILE, RecStore, store_key
from privrec.unlearning.approx.task import InfluenceSection
from privrec.unlearning.exact.forget import run_resume, submit_forget
from privrec.unlearning.exact.ledger import DONE, INSTALLED, PENDING, Ledger, last_request_of
from privrec.unlearning.exact.routes import forget_refusal

RETRY_SECONDS = 30.0  # a failed request is tried again after this long (its error is shown meanwhile)
RECENT_USERS = 10_000  # users remembered as recently asked for (the store is filled for them first)
# what a person asking to be deleted is told when the served model cannot forget (the operator's reason, which
# names commands and config keys, is printed when the service starts and shown by /healthz)
NO_DELETION = ("this service cannot delete your data on request: its model cannot forget exactly; ask the "
               "service's operator")


class NotFound(NotFoundError):
    """An unknown user, item or request (HTTP 404)."""


class Gone(UserError):
    """A user with an accepted deletion request (HTTP 410)."""


class NotReady(UserError):
    """A request's certificate before it is done (HTTP 409)."""


class CannotForget(UserError):
    """A model kind that cannot forget exactly (HTTP 409)."""


class Metrics:
    """Request counts by (route, status) and latencies of the last ``window`` requests per route."""

    def __init__(self, window: int = 2000):
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, int], int] = {}
        self.latency: dict[str, deque] = {}
        self.window = window
        self.started = time.time()

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.counts[(route, status)] = self.counts.get((route, status), 0) + 1
            self.latency.setdefault(route, deque(maxlen=self.window)).append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            routes: dict[str, dict] = {}
            for (route, status), n in sorted(self.counts.items()):
                routes.setdefault(route, {"count": 0, "by_status": {}})
                routes[route]["count"] += n
                routes[route]["by_status"][str(status)] = n
            for route, lat in self.latency.items():
                x = np.array(lat) * 1000.0
                routes[route].update(p50_ms=float(np.percentile(x, 50)), p99_ms=float(np.percentile(x, 99)),
                                     mean_ms=float(x.mean()), window=len(x))
        return {"uptime_seconds": time.time() - self.started, "routes": routes}


class Service:
    """One served model directory.

    Args:
        candidates: C, the candidate stage's size (None: the LLM scores every unseen item).
        blend: see :meth:`Recommender.recommend`.
        store_k: how many items the precomputed store keeps per user.
        precompute: the worker computes every user's top-``store_k`` at start (when the store is not current)
            and after each applied deletion.
        refill_before_swap: with ``precompute``, fill the store under a deletion's new adapters before swapping
            them in (the old adapters keep answering from their store meanwhile); False: swap at once and fill
            the store afterwards, answering the users not yet filled online.
        executor: where the store's fills and a deletion's retrains run (default: this process); ``ray``: the
            fill in blocks of users and a shards model's affected shards as Ray tasks (docs/scaling.md), the
            same store and certificate as here.
        approximate: ``influence`` (a shards model only): before a users request's exact replay, serve the
            shards with each affected shard's adapter moved by one influence step without the users
            (:mod:`privrec.serve.approximate`); the exact adapters replace it, and only they are certified.
            None (the default): the old adapters serve until the exact ones are swapped in.

    Raises:
        RunError: not a model directory, or another privrec command holds it.
    """

    def __init__(self, model: str | Path, candidates: int | None = 50, blend: float = 0.0, store_k: int = 20,
                 precompute: bool = False, max_k: int = 100, progress: bool = False, source: str = "popularity",
                 refill_before_swap: bool = True, executor: ExecutorConfig | None = None,
                 approximate: str | None = None, influence: InfluenceSection | None = None):
        self.path = Path(model)
        self.approximate, self.influence = approximate, influence or InfluenceSection()
        self.executor = executor or ExecutorConfig()  # the store's fills and a deletion's shards: here or Ray tasks
        self.candidates, self.blend, self.store_k, self.precompute = candidates, blend, store_k, precompute
        self.refill_before_swap = refill_before_swap
        self.max_k, self.progress, self.source = max_k, progress, source
        self._hold = contextlib.ExitStack()
        self._hold.enter_context(run_lock(self.path))  # for the service's life
        try:
            self._finish_interrupted_swap()
            self.tokens = TokenStore(self.path)
            self.store = RecStore(self.path)
            self.metrics = Metrics()
            self.plan_lock = threading.Lock()  # recording a request vs swapping adapters in
            self.swap_lock = threading.Lock()  # the recommender reference
            self.rec = self._build()
            # None: deletion requests are taken; else the line privrec forget refuses this model with
            self.refusal: str | None = forget_refusal(self.path, ROUTES)
            self.forgets_by = None if self.refusal else models.exact_route(self.rec.md.manifest)
            check_approximate(approximate, self.rec.md.kind)
            self.approx_log = ApproximateLog(self.path)  # which model served each request's neighbours, when
            if self.refusal is None:
                source_data(self.rec.cfg)  # every sample of the source, memoised: a forget request needs them
            self.forgotten: dict[int, str] = self._forgotten_users()
            self.known_users = set(self.rec.splits.dataset.users) | set(
                int(u) for u in self.rec.splits.dataset.inter["user_id"].unique())
            self.worker_state = "idle"
            self._swapping: str | None = None  # the request whose new adapters are being swapped in
            self.errors: dict[str, str] = {}  # request id -> why its last attempt failed
            self.attempts: dict[str, tuple[int, float]] = {}  # request id -> (failed attempts, when the last failed)
            self.failed_attempts = 0  # every failed attempt of the service's life
            self.skipped: dict[int, str] = {}  # user -> why the store could not hold them
            self._wake = threading.Event()
            self._stop = threading.Event()
            self._recent: OrderedDict[int, None] = OrderedDict()  # users asked for, most recent last
            self._recent_lock = threading.Lock()
            self.next_store: RecStore | None = None  # filled under a deletion's new adapters before their swap
            self._arrived = threading.Event()  # a deletion request accepted (ends such a fill early)
            if precompute:  # a store made with other adapters or settings is never served again
                self._continue_interrupted_refill()
                self.store.begin(self._key(), store_k)
            self._store_stale = precompute and not self._store_full()
            self._worker = threading.Thread(target=self._work, name="privrec-deletions", daemon=True)
        except BaseException:
            self._hold.close()
            raise

    # --- life ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker: it resumes unfinished requests first."""
        self._worker.start()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker.is_alive():
            self._worker.join(timeout=600)
        self._hold.close()

    def _finish_interrupted_swap(self) -> None:
        """A request killed after its retrain (status retrained / installed) is finished before serving: the
        adapters on disk may be half swapped. A pending one is left to the worker (the old adapters are
        whole; its users are refused meanwhile)."""
        path = self.path / LEDGER_FILE
        if not path.is_file():
            return
        ledger = Ledger(path, create=False)
        try:
            req = ledger.unfinished()
        finally:
            ledger.close()
        if req is not None and req["status"] != PENDING:
            run_resume(self.path, progress=self.progress, lock=False, routes=ROUTES, executor=self.executor)

    def _continue_interrupted_refill(self) -> None:
        """A service killed while it filled the store under new adapters (already on disk) takes that store
        up as its own; one made under other adapters or settings is removed."""
        nxt = RecStore(self.path, NEXT_FILE)
        if nxt.current(self._key(), self.store_k):
            self.store.adopt(nxt)
        elif nxt.path.is_file():
            nxt.discard()

    def _build(self) -> Recommender:
        rec = Recommender(self.path, pending_ok=True, progress=self.progress)
        if self.candidates:
            rec.generator  # noqa: B018  (fit the MF here, not in a request thread: it sets torch's thread count)
        return rec

    def _key(self, rec: Recommender | None = None) -> dict:
        return store_key((rec or self.rec).digest, self.candidates, self.blend, self.source)

    def _store_full(self) -> bool:
        """The store is current and holds every servable user."""
        return self.store.current(self._key(), self.store_k) and all(
            u in self.store.users for u in self.rec.users() if u not in self.forgotten)

    def _forgotten_users(self) -> dict[int, str]:
        """user -> the request that deletes them: every user named by a users request (pending or done) and
        every user whose interactions are all deleted."""
        out = dict(self.rec.md.deleted_by)
        path = self.path / LEDGER_FILE
        if path.is_file():
            ledger = Ledger(path, create=False)
            try:
                for req in ledger.requests():
                    if req["kind"] == "users":
                        for u in read_spec(req)["users"]:
                            out.setdefault(int(u), req["id"])
            finally:
                ledger.close()
        return out

    # --- reading --------------------------------------------------------------------------------------------
    def check_user(self, user: int) -> None:
        """Raises: NotFound (never in the data), Gone (an accepted deletion request)."""
        if user not in self.known_users:
            raise NotFound(f"user {user} not found in {self.rec.ds.name}")
        if user in self.forgotten:
            raise Gone(f"user {user} asked for their data to be deleted (request {self.forgotten[user]}): nothing "
                       "is served for them")

    def recommendations(self, user: int, k: int) -> dict:
        self.check_user(user)
        self._asked(user)
        with self.swap_lock:  # the recommender and its store read together: a swap never falls between them
            rec = self.rec  # one reference for the whole request (a swap does not cut it)
            key = self._key(rec)
            items = self.store.get(user, k, key)
        source = "store"
        if items is None:
            n = max(k, self.store_k) if self.precompute else k  # the same candidates scored: keep the top store_k
            items, source = rec.recommend(user, n, two_stage=self.candidates, blend=self.blend,
                                          source=self.source), "online"
            if self.precompute:
                # kept in memory only: the file (about 2 MB for 943 users) is the worker's to write
                self.store.add(key, self.store_k, {user: items}, self.forgotten.__contains__, write=False)
            items = items[:k]
        if user in self.forgotten:  # accepted while it was being computed
            raise Gone(f"user {user} asked for their data to be deleted (request {self.forgotten[user]})")
        out = {"user": user, "k": k, "items": items, "source": source, "candidates": self.candidates}
        if rec.approximate:  # not the certified model: say so with the answer
            out["approximate"] = rec.approximate
        return out

    def _asked(self, user: int) -> None:
        with self._recent_lock:
            self._recent.pop(user, None)
            self._recent[user] = None
            if len(self._recent) > RECENT_USERS:
                self._recent.popitem(last=False)

    def _fill_order(self, users: list[int]) -> list[int]:
        """``users``, those asked for most recently first, then the rest in their order."""
        with self._recent_lock:
            recent = list(reversed(self._recent))
        wanted = set(users)
        first = [u for u in recent if u in wanted]
        chosen = set(first)
        return first + [u for u in users if u not in chosen]

    def score(self, pairs: list[tuple[int, int]]) -> list[dict]:
        rec = self.rec
        for u, i in pairs:
            self.check_user(u)
            if i not in rec.ds.items:
                raise NotFound(f"item {i} not found in {rec.ds.name}")
        by_user: dict[int, list[int]] = {}
        for n, (u, _) in enumerate(pairs):
            by_user.setdefault(u, []).append(n)
        out = [0.0] * len(pairs)
        for u, idx in by_user.items():
            probs = rec.p_yes(u, [pairs[n][1] for n in idx])
            for n, p in zip(idx, probs):
                out[n] = float(p)
        for u in by_user:
            self.check_user(u)
        return [{"user": u, "item": i, "p_yes": p} for (u, i), p in zip(pairs, out)]

    def history(self, user: int) -> list[dict]:
        """The user's remaining ratings, oldest first."""
        self.check_user(user)
        rows = self.rec.ds.inter[self.rec.ds.inter["user_id"] == user]
        items = self.rec.ds.items
        suffix, shown = self.rec.ds.schema.suffix, self.rec.ds.schema.shown
        return [{"item_id": int(i), "title": items[int(i)].title, "year": suffix(items[int(i)]),
                 "fields": shown(items[int(i)]), "rating": float(r),
                 "timestamp": int(t)} for i, r, t in zip(rows["item_id"], rows["rating"], rows["timestamp"])]

    # --- deletion requests ----------------------------------------------------------------------------------
    def forget(self, user: int) -> tuple[dict, bool]:
        """Record a deletion of every interaction of ``user``; (the request, whether it is new). Returns only
        once the request is committed to the ledger.

        Raises:
            NotFound: unknown user. UserError: a model kind that cannot forget exactly.
        """
        if user not in self.known_users:
            raise NotFound(f"user {user} not found in {self.rec.ds.name}")
        if self.refusal is not None:
            raise CannotForget(NO_DELETION)
        with self.plan_lock:
            if user in self.forgotten:
                return self.request(self.forgotten[user]), False
            try:
                recorded = submit_forget(self.path, [user], routes=ROUTES)
            except NotFoundError as e:  # a user the data holds no interaction of
                raise NotFound(str(e)) from None
            except UserError as e:  # e.g. a clients model: it says which model can
                raise CannotForget(str(e)) from None
            rid = recorded.get("request")
            if rid is None:  # every interaction deleted already (e.g. by privrec forget --samples)
                rid = self.rec.md.deleted_by.get(user) or self._last_request_of(user)
            self.forgotten[user] = rid
        nxt = self.next_store  # purged before the served store: a swap adopting it in between is purged after
        if nxt is not None:
            nxt.purge(user)
        self.store.purge(user)
        self._arrived.set()
        self._wake.set()
        return self.request(rid), recorded.get("request") is not None

    def _last_request_of(self, user: int) -> str:
        with self._ledger() as ledger:
            return last_request_of(ledger.tombstone_rows())[user]

    @contextlib.contextmanager
    def _ledger(self):
        path = self.path / LEDGER_FILE
        if not path.is_file():
            raise NotFound("no deletion request was made on this model")
        ledger = Ledger(path, create=False)
        try:
            yield ledger
        finally:
            ledger.close()

    def request(self, rid: str) -> dict:
        """A request's status and its history. Raises: NotFound."""
        with self._ledger() as ledger:
            try:
                req = ledger.request(rid)
            except RunError:
                raise NotFound(f"no deletion request {rid}") from None
            events = ledger.events(rid)
        spec = read_spec(req)
        status = req["status"]
        if status == DONE and rid == self._swapping:  # certified, but the old adapters still serve: not yet done
            status, events = INSTALLED, [e for e in events if e["status"] != DONE]
        history = [{"status": e["status"], "at": e["at"]} for e in events]
        approx = self.approx_log.get(rid)
        if approx is not None:  # served before the exact adapters: in the history, in order, never certified
            history.append({"status": "approximate", "at": approx["served_from"]})
            history.sort(key=lambda e: e["at"])
        out = {"id": rid, "status": status, "kind": req["kind"], "users": spec.get("users"),
               "created": req["created"], "updated": req["updated"], "history": history,
               "certificate": f"/v1/requests/{rid}/certificate" if status == DONE else None}
        if approx is not None:
            out["approximate"] = approx
        if rid in self.errors:  # tried again every RETRY_SECONDS: how often it failed, when it is tried next
            n, at = self.attempts[rid]
            out.update(error=self.errors[rid], attempts=n,
                       next_attempt_in_seconds=round(max(0.0, at + RETRY_SECONDS - time.time()), 1))
        return out

    def certificate(self, rid: str) -> dict:
        """Raises: NotFound, NotReady."""
        req = self.request(rid)
        if req["status"] != DONE:
            raise NotReady(f"request {rid} is not done yet ({req['status']}); its certificate follows")
        cert = read_json(self.path / CERTIFICATES_DIR / f"{rid}.json")
        approx = req.get("approximate")
        if approx is None:
            return cert
        done_at = next((e["at"] for e in req["history"] if e["status"] == DONE), None)
        return dict(cert, served=served_models(approx, done_at))  # beside the signed body: what served when

    # --- the worker ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=RETRY_SECONDS)
            self._wake.clear()
            while not self._stop.is_set() and self._apply_next():
                pass
            if self._store_stale and not self._stop.is_set():
                self._precompute()

    def _apply_next(self) -> bool:
        """Apply the first unfinished request, then swap in a recommender built on the new adapters; False
        when there is none, or it failed (tried again later)."""
        if not (self.path / LEDGER_FILE).is_file():
            return False
        with self._ledger() as ledger:
            req = ledger.unfinished()
        if req is None:
            return False
        rid = req["id"]
        self.worker_state = f"applying {rid}"
        self._swapping = rid  # done in the ledger before the new adapters serve: reported as installed until then
        try:
            if self.approximate and req["kind"] == "users" and req["status"] == PENDING and \
                    self.rec.approximate != rid:
                self._serve_approximate(rid, {int(u) for u in read_spec(req)["users"]})
            run_resume(self.path, progress=self.progress, lock=False, swap_guard=self.plan_lock, routes=ROUTES,
                       executor=self.executor)
            new = self._build()  # off to the side: requests keep using the old one meanwhile
            filled = False
            if self.precompute and self.refill_before_swap:
                try:
                    filled = self._refill(new)
                except Exception:  # the store only; the request is done: its adapters are swapped in regardless
                    self.rec.md.run.log(f"serve: filling the store for {rid} failed: "
                                        f"{traceback.format_exc(limit=3)}", echo=False)
            with self.swap_lock:
                if self.precompute:  # from now on the store takes only what the new adapters compute
                    if self.next_store is not None:
                        self.store.adopt(self.next_store)
                    self.store.begin(self._key(new), self.store_k)  # continued when adopted
                self.next_store = None
                self.rec = new
            self.approx_log.replaced(rid)
            self.errors.pop(rid, None)
            self.attempts.pop(rid, None)
            self._store_stale = self.precompute and not filled
            return True
        except Exception as e:  # the request stays unfinished in the ledger; the service keeps serving
            self.errors[rid] = " ".join(str(e).split()) or type(e).__name__
            self.attempts[rid] = (self.attempts.get(rid, (0, 0.0))[0] + 1, time.time())
            self.failed_attempts += 1
            self.rec.md.run.log(f"serve: request {rid} failed (attempt {self.attempts[rid][0]}, tried again in "
                                f"{RETRY_SECONDS:.0f}s): {traceback.format_exc(limit=3)}", echo=False)
            return False
        finally:
            self._swapping = None
            self.worker_state = "idle"

    def _serve_approximate(self, rid: str, users: set[int]) -> None:
        """Serve request ``rid``'s approximate model (:mod:`privrec.serve.approximate`) until its exact adapters
        are swapped in; a failure is logged and leaves the old adapters serving (the exact route goes on)."""
        self.worker_state = f"approximating {rid}"
        try:
            t0 = time.perf_counter()
            rec = self._build()
            states, info = influence_states(rec, users, self.influence,
                                            log=lambda m: self.rec.md.run.log(f"serve {rid}: {m}", echo=False))
            if not states:  # the users held no training sample: no adapter moves
                return
            rec = approximate_recommender(rec, rid, states)
            with self.swap_lock:
                self.rec = rec
            self.approx_log.served(rid, self.approximate, info, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - the exact route is what the request needs; this only came first
            self.rec.md.run.log(f"serve: the approximate answer to {rid} failed: {traceback.format_exc(limit=3)}",
                                echo=False)
        finally:
            self.worker_state = f"applying {rid}"

    def _precompute(self, only: list[int] | None = None) -> None:
        """Fill the store with every servable user's top-``store_k`` (or those of ``only``), the users asked for
        most recently first, skipping those it holds already; stops early for a deletion request (what it
        computed is kept)."""
        self.worker_state = "precomputing"
        self.store.begin(self._key(), self.store_k)
        try:
            if self._fill(self.rec, self.store, self._wake, only) and only is None:
                self._store_stale = False  # every user tried (a failed one is tried again after the next deletion)
        finally:
            self.worker_state = "idle"

    def _refill(self, new: Recommender) -> bool:
        """Fill :attr:`next_store` under ``new``'s adapters before they are swapped in; True when every user was
        tried, False when a deletion request arrived meanwhile (the swap then happens with what is filled)."""
        if self._key(new) == self._key():  # no adapter changed (the request's users held no training sample):
            return False  # the served store stays valid; what it lacks is filled after the swap
        self._arrived.clear()
        self.next_store = RecStore(self.path, NEXT_FILE)
        self.next_store.begin(self._key(new), self.store_k)  # continued when a killed service had begun it
        self.worker_state = f"filling the store under the new adapters of {self._swapping}"
        return self._fill(new, self.next_store, self._arrived)

    def _fill(self, rec: Recommender, store: RecStore, interrupt: threading.Event,
              only: list[int] | None = None) -> bool:
        """Add the top-``store_k`` of ``rec`` for every servable user (or those of ``only``) that ``store`` lacks,
        those asked for most recently first; False when ``interrupt`` (or the service's stop) ended it early."""
        key = self._key(rec)
        try:
            todo = [u for u in self._fill_order(rec.users() if only is None else only)
                    if u not in self.forgotten and u not in store.users]
            if self.executor.kind != "local":
                return self._fill_with(rec, store, todo, lambda: interrupt.is_set() or self._stop.is_set())
            for u in track(todo, len(todo), "filling the store", enabled=self.progress, unit="user"):
                if interrupt.is_set() or self._stop.is_set():
                    return False
                if u in self.forgotten:
                    continue
                try:
                    items = rec.recommend(u, self.store_k, two_stage=self.candidates, blend=self.blend,
                                          source=self.source)
                except UserError as e:  # e.g. too short a history: answered online (with its error), counted
                    self._keep(store, key, u, None, " ".join(str(e).split()))
                    continue
                self._keep(store, key, u, items, None)
            return True
        finally:
            store.flush()

    def _keep(self, store: RecStore, key: dict, user: int, items: list[dict] | None, why: str | None) -> None:
        """Add ``user``'s top-k to ``store``, or (``why``: the store cannot hold them) log and count it once."""
        if why is not None:
            if self.skipped.get(user) != why:
                self.rec.md.run.log(f"serve: user {user} left out of the store: {why}", echo=False)
            self.skipped[user] = why
            return
        self.skipped.pop(user, None)
        store.add(key, self.store_k, {user: items}, self.forgotten.__contains__)

    def _fill_with(self, rec: Recommender, store: RecStore, todo: list[int], stop: Callable[[], bool]) -> bool:
        """:meth:`_fill`'s users as Ray tasks of :data:`FILL_BLOCK` users each (an executor other than local):
        the recommender reaches each worker once; this process adds each block to the store as it finishes (the
        store is written sorted by user: the same file as a local fill). ``stop`` (a deletion request arrived, or
        the service stops) cancels the blocks not finished; returns False when it did."""
        key = self._key(rec)
        blocks = [todo[i:i + FILL_BLOCK] for i in range(0, len(todo), FILL_BLOCK)]

        def add(i: int, rows: list[tuple[int, list[dict] | None, str | None]]) -> None:
            for u, items, why in rows:
                if u not in self.forgotten:  # a deletion accepted while the block ran: never stored
                    self._keep(store, key, u, items, why)

        with open_executor(self.executor, self.path, self.rec.md.run.log) as ex:
            rows = ex.map(fill_task, (rec, self.store_k, self.candidates, self.blend, self.source), blocks,
                          labels=[f"users {b[0]}..{b[-1]}" for b in blocks], on_result=add,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True), stop=stop)
        return all(r is not None for r in rows)  # a stopped map leaves the blocks it cancelled None

    def precompute_now(self, users: list[int] | None = None) -> int:
        """Compute the store in this thread (``privrec serve --precompute-only``); returns the users stored."""
        self._precompute(users)
        return len(self.store.users)

    def store_status(self) -> dict:
        """How far the precomputed store is: users it holds under the installed adapters, of those servable."""
        current = self.store.current(self._key(), self.store_k)
        servable = sum(u not in self.forgotten for u in self.rec.users())
        out = {"precompute": self.precompute, "current": current,
               "users": len(self.store.users) if current else 0, "servable": servable, "skipped": len(self.skipped)}
        nxt = self.next_store
        if nxt is not None:  # being filled under a deletion's new adapters, not served yet
            out["next_users"] = len(nxt.users)
        return out

    def deletion_status(self) -> dict:
        """The worker's failures: every failed attempt, and the requests failing now (tried again every
        RETRY_SECONDS)."""
        return {"failed_attempts": self.failed_attempts, "failing": sorted(self.errors),
                "retry_seconds": RETRY_SECONDS}

    def pending(self) -> int:
        path = self.path / LEDGER_FILE
        if not path.is_file():
            return 0
        with self._ledger() as ledger:
            return sum(1 for r in ledger.requests() if r["status"] != DONE)


FILL_BLOCK = 16  # users per Ray task of a store fill


def fill_task(shared: tuple, users: list[int]) -> list[tuple[int, list[dict] | None, str | None]]:
    """A block of users' top-k as a unit of an executor: (user, items, None), or (user, None, why) for a user the
    store cannot hold (answered online with its error)."""
    rec, k, candidates, blend, source = shared
    out: list[tuple[int, list[dict] | None, str | None]] = []
    for u in users:
        try:
            out.append((u, rec.recommend(u, k, two_stage=candidates, blend=blend, source=source), None))
        except UserError as e:
            out.append((u, None, " ".join(str(e).split())))
    return out


def read_spec(req: dict) -> dict:
    return json.loads(req["spec"])
