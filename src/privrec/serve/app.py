"""The HTTP face of :class:`~privrec.serve.service.Service` (FastAPI; OpenAPI at ``/openapi.json``, docs at
``/docs``; METHODS §11, docs/serving.md).

Every error is ``{"error": "..."}`` with its 4xx: 401 missing / bad / revoked token, 403 another user's data
(or an admin endpoint), 404 unknown user, item, request or route, 409 a certificate not ready or a model
that cannot forget, 410 a user with an accepted deletion request, 413 a body over the limit, 422 a request
that does not parse (malformed JSON, a bad parameter). Nothing a client sends gives a 500.
"""

from __future__ import annotations

import json
import time
from importlib import resources

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from privrec.errors import RunError, UserError
from privrec.serve.auth import Principal
from privrec.serve.service import CannotForget, Gone, NotFound, NotReady, Service

MAX_BODY = 64 * 1024  # bytes; a score batch of MAX_BATCH pairs is ~10 KiB
MAX_BATCH = 256  # (user, item) pairs per /v1/score request


# --- bodies ---------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Body):
    error: str


class Health(_Body):
    status: str
    model: str
    kind: str
    forgets_by: str | None = Field(description="the exact route a deletion request takes (null: none is taken)")
    cannot_forget: str | None = Field(description="why deletion requests are refused (null: they are taken)")
    pending_deletions: int
    worker: str


class Me(_Body):
    token_id: str
    user: int | None
    admin: bool
    forgets_by: str | None = Field(description="how the model forgets a user's data (null: it cannot, and "
                                               "deletion requests answer 409)")


FIELDS_HELP = ("the item's other fields by the data's display names (MovieLens: genres; a table source: its "
               "schema's item fields); `year` is the schema's title_suffix field")


class Item(_Body):
    rank: int
    item_id: int
    title: str
    year: int | str | None
    fields: dict[str, str] = Field(default_factory=dict, description=FIELDS_HELP)
    p_yes: float


class Recommendations(_Body):
    user: int
    k: int
    items: list[Item]
    source: str = Field(description="store (precomputed) or online")
    candidates: int | None = Field(description="C, the candidate stage's size (null: every unseen item)")
    approximate: str | None = Field(None, description="with serve --approximate: the deletion request whose "
                                    "approximate (not certified) model answered; null when the exact one did")


class Rating(_Body):
    item_id: int
    title: str
    year: int | str | None
    fields: dict[str, str] = Field(default_factory=dict, description=FIELDS_HELP)
    rating: float
    timestamp: int


class History(_Body):
    user: int
    ratings: list[Rating]


class Pair(_Body):
    user: int
    item: int


class ScoreRequest(_Body):
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_BATCH,
                              description=f"(user, item) pairs, at most {MAX_BATCH}")


class Score(_Body):
    user: int
    item: int
    p_yes: float


class Scores(_Body):
    scores: list[Score]


class Event(_Body):
    status: str
    at: float


class RequestStatus(_Body):
    id: str
    status: str = Field(description="pending -> retrained -> installed -> done (history may hold approximate: "
                        "when an approximate model began to serve)")
    kind: str
    users: list[int] | None
    created: float
    updated: float
    history: list[Event]
    certificate: str | None = Field(description="where to download the certificate, once done")
    error: str | None = Field(None, description="why its last attempt failed (it is tried again)")
    attempts: int | None = Field(None, description="failed attempts so far, while it fails")
    next_attempt_in_seconds: float | None = Field(None, description="when the worker tries it again")
    approximate: dict | None = Field(None, description="with serve --approximate: the approximate model served "
                                     "before the exact one (method, shards moved, served_from, served_until, "
                                     "certified: false)")


class Problem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


STATUS_OF: list[tuple[type[Exception], int]] = [(NotFound, 404), (Gone, 410), (NotReady, 409), (CannotForget, 409),
                                                 (RunError, 409),
                                                 (UserError, 400)]


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        if e.get("type") == "json_invalid":
            return f"malformed JSON body ({e.get('ctx', {}).get('error', 'cannot parse')})"
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before any handler reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.limit)
        chunks, size = [], 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            chunks.append(message)
            too_big = size > self.limit
            if not message.get("more_body"):
                break
        if too_big:
            response = _error(413, f"request body over {self.limit} bytes")
            return await response(scope, receive, send)

        async def replay():
            return chunks.pop(0) if chunks else await receive()

        return await self.app(scope, replay, send)


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``."""
    app = FastAPI(title="privrec", summary="Recommendations and the right to be forgotten (METHODS §11)",
                  version="1")

    # --- errors: always {"error": ...} ---------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail),
                      getattr(exc, "headers", None))

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, str(exc), headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return _error(next(code for cls, code in STATUS_OF if isinstance(exc, cls)), str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug of ours, never the client's input
        return _error(500, f"internal error ({type(exc).__name__})")

    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = f"{request.method} {route.path}" if route is not None else "unmatched"
        service.metrics.observe(name, response.status_code, time.perf_counter() - t0)
        return response

    # --- auth -------------------------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "missing bearer token (Authorization: Bearer <token>)")
        who = service.tokens.authenticate(token.strip())
        if who is None:
            raise Problem(401, "invalid or revoked token")
        return who

    def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.admin:
            raise Problem(403, "an admin token is needed")
        return who

    def may_touch(who: Principal, user: int) -> None:
        if not who.may_touch(user):
            raise Problem(403, f"this token belongs to user {who.user}; it cannot read or delete user {user}'s data")

    def read_request(who: Principal, rid: str) -> dict:
        """The request, for an admin or the user it deletes; another user's request answers as a missing one
        does (404), so a user token cannot count anyone's deletion requests."""
        try:
            req = service.request(rid)
        except NotFound:
            req = None
        if req is None or not (who.admin or who.user in (req.get("users") or [])):
            raise NotFound(f"no deletion request {rid}")
        return req

    User = Path(description="user id")
    responses = {c: {"model": Error} for c in (400, 401, 403, 404, 409, 410, 413, 422)}

    # --- endpoints ------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("privrec.serve").joinpath("page.html").read_text()

    @app.get("/healthz", response_model=Health)
    def healthz():
        return Health(status="ok", model=service.path.name, kind=service.rec.md.kind,
                      forgets_by=service.forgets_by, cannot_forget=service.refusal,
                      pending_deletions=service.pending(), worker=service.worker_state)

    @app.get("/v1/me", response_model=Me, responses=responses)
    def me(who: Principal = Depends(principal)):
        return Me(token_id=who.token_id, user=who.user, admin=who.admin, forgets_by=service.forgets_by)

    @app.get("/v1/users/{user}/recommendations", response_model=Recommendations, responses=responses)
    def recommendations(user: int = User, k: int = Query(10, ge=1, le=service.max_k, description="how many items"),
                        who: Principal = Depends(principal)):
        may_touch(who, user)
        return service.recommendations(user, k)

    @app.get("/v1/users/{user}/history", response_model=History, responses=responses)
    def history(user: int = User, who: Principal = Depends(principal)):
        may_touch(who, user)
        return History(user=user, ratings=service.history(user))

    @app.post("/v1/score", response_model=Scores, responses=responses)
    def score(body: ScoreRequest, who: Principal = Depends(principal)):
        for p in body.pairs:
            may_touch(who, p.user)
        return Scores(scores=service.score([(p.user, p.item) for p in body.pairs]))

    @app.post("/v1/users/{user}/forget", status_code=202, response_model=RequestStatus, responses=responses)
    def forget(user: int = User, who: Principal = Depends(principal)):
        """Accepted (202) only once the request is durably in the model's ledger; asking again for the same
        user returns the same request."""
        may_touch(who, user)
        req, _ = service.forget(user)
        return req

    @app.get("/v1/requests/{rid}", response_model=RequestStatus, responses=responses)
    def request_status(rid: str, who: Principal = Depends(principal)):
        return read_request(who, rid)

    @app.get("/v1/requests/{rid}/certificate", responses=responses)
    def certificate(rid: str, who: Principal = Depends(principal)):
        read_request(who, rid)
        return JSONResponse(service.certificate(rid),
                            headers={"Content-Disposition": f'attachment; filename="certificate-{rid}.json"'})

    @app.get("/metrics", responses=responses)
    def metrics(who: Principal = Depends(admin)):
        return {**service.metrics.snapshot(), "store": service.store_status(), "deletions": service.deletion_status()}

    return app
