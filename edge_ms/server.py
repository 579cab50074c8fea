"""An OpenAI-compatible HTTP server: ``/v1/chat/completions`` runs best-of-N reasoning on one loaded model.

One worker thread owns the Reasoner (a llama.cpp context is not thread-safe) and takes jobs from a
bounded queue; the async handlers only validate, enqueue and relay what the worker posts back onto
the event loop. A full queue answers 429; a client that goes away has its generation aborted, so
its KV cells are freed and the next job starts at once.

Web pages are hostile: only requests naming this server in ``Host`` are served (DNS rebinding),
only JSON bodies start a generation (a page can POST text/plain cross-site without asking), and
browsers may read answers only for the origins the user allowed. Message contents never become
control tokens, so a user cannot write another role's turn.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import queue
import reprlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_ms.errors import EdgeMSError
from edge_ms.modes import MODES
from edge_ms.reasoner import Reasoner, Result
from edge_ms.select import STRATEGIES

__all__ = ["Access", "ApiError", "check_settings", "create_app", "parse_request", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 2048  # when the request names none (clamped to the room the prompt leaves)
PROGRESS_EVERY_S = 0.2  # streaming progress chunks; also how soon a vanished stream is noticed
POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_BODY_BYTES = 8 << 20  # far more than any context's worth of text, even JSON-escaped
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EVERY_INTERFACE = ("0.0.0.0", "::", "")
# Bad values are named in error messages, cut short: a request may send a megabyte of them.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother, _repr.maxlong = 2, 4, 4, 40, 40, 40
_show = _repr.repr


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry later", kind="server_error")


def check_settings(*, queue_size: int = 1, api_key: str | None = None, port: int = 0) -> None:
    """The serve settings a user gives, checked before anything loads: one EdgeMSError line each."""
    if queue_size < 1:
        raise EdgeMSError(f"--queue-size {queue_size}: must be at least 1")
    if api_key is not None and (not api_key or api_key != api_key.strip()):
        # An empty key would accept an empty bearer token; spaces around it could never match.
        raise EdgeMSError("--api-key: empty or with spaces around it; give a key, or leave the option out")
    if not 0 <= port <= 65535:
        raise EdgeMSError(f"--port {port}: must be from 0 to 65535")


@dataclass
class Job:
    """One chat completion request, from the handler to the worker and back."""

    messages: list[dict[str, str]]
    mode: str
    max_tokens: int | None
    sampling: dict
    stream: bool
    usage: bool  # streaming: end with a usage chunk (stream_options.include_usage)
    search: dict  # the edge_ms extension: strategy (and beam_width), passed to Reasoner.stream
    loop: asyncio.AbstractEventLoop
    inbox: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


@dataclass
class Metrics:
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    generated_tokens: int = 0
    last_cancelled: dict | None = None  # tokens the last cancelled job made, against its budget


class Worker:
    """The thread that owns the Reasoner; everything else talks to it through ``submit`` and ``cancel``."""

    def __init__(self, reasoner: Reasoner, queue_size: int) -> None:
        check_settings(queue_size=queue_size)
        self.reasoner = reasoner
        self.jobs: queue.Queue[Job | None] = queue.Queue(queue_size)
        self.metrics = Metrics()
        self.closing = False
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="edge-ms-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Shutdown begins: refuse new jobs, answer the waiting ones and stop the running one (503)."""
        with self._lock:
            self.closing = True
            current = self._current
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post("error", _shutting_down())
        if current is not None:
            self.cancel(current)  # its generation stops within a decode step and _run answers 503

    def stop(self) -> None:
        self.close()
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self.closing:
            raise _shutting_down()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.metrics.rejected += 1
            raise ApiError(
                429,
                f"the server is busy: {self.jobs.maxsize} requests are already waiting; retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            ) from None

    def cancel(self, job: Job) -> None:
        # Under the lock, so the abort flag is never set for a job that is no longer the current one.
        with self._lock:
            job.cancelled.set()
            if self._current is job:
                self.reasoner.engine.abort.set()

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "queue": {
                    "waiting": self.jobs.qsize(),
                    "capacity": self.jobs.maxsize,
                    "running": self._current is not None,
                },
                **asdict(self.metrics),
            }

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self._lock:
                if self.closing:  # taken after close() emptied the queue
                    job.post("error", _shutting_down())
                    continue
                if job.cancelled.is_set():  # its client left while it waited
                    self.metrics.cancelled += 1
                    continue
                self._current = job
            try:
                self._run(job)
            except Exception as err:  # noqa: BLE001 - every failure goes back to its client
                if isinstance(err, ApiError):
                    error = err
                elif isinstance(err, EdgeMSError):
                    error = ApiError(400, str(err))
                else:
                    log.exception("generation failed")
                    error = ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
                with self._lock:
                    self.metrics.errors += 1
                job.post("error", error)
            finally:
                with self._lock:
                    self._current = None

    def _budget(self, job: Job, ids: list[int]) -> int:
        """New tokens per trajectory: the request's max_tokens, else what the context leaves (400 if too few)."""
        n_ctx = self.reasoner.model.n_ctx_train
        room = n_ctx - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"the messages take {len(ids)} tokens and the model's context is {n_ctx} tokens, "
                "so no room is left for an answer; shorten the messages",
                "messages",
                "context_length_exceeded",
            )
        if job.max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if job.max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens {job.max_tokens}: the prompt has {len(ids)} tokens and the model's context "
                f"is {n_ctx}, so at most {room} new tokens fit",
                "max_tokens",
                "context_length_exceeded",
            )
        return job.max_tokens

    def _run(self, job: Job) -> None:
        r = self.reasoner
        # Message contents come from users: their special-token text must stay text.
        ids = r.prompt_ids(job.messages, parse_special=False)
        max_new = self._budget(job, ids)
        n = MODES[job.mode]
        r.engine.plan_context(len(ids), n, max_new)  # the KV budget check, before anything runs
        progress = {"n": n, "finished": 0, "generated_tokens": 0, "steps": 0, "forks": 0, "started": 0}
        t0 = last = time.monotonic()
        result: Result | None = None
        events = r.stream(
            job.messages,
            job.mode,
            max_new_tokens=max_new,
            should_stop=job.cancelled.is_set,
            parse_special=False,
            **job.sampling,
            **job.search,
        )
        for ev in events:
            if ev.kind == "done":
                result = ev.result
                break
            progress["generated_tokens"] += ev.kind == "token"
            progress["steps"] += ev.kind == "step"
            progress["finished"] += ev.kind == "finish"
            progress["forks"] += ev.kind == "fork"
            progress["started"] += ev.kind in ("fork", "start")
            now = time.monotonic()
            if job.stream and (ev.kind == "finish" or now - last >= PROGRESS_EVERY_S):
                job.post("progress", dict(progress))
                last = now
        made = result.stats.generated_tokens
        with self._lock:
            self.metrics.generated_tokens += made
            if job.cancelled.is_set():
                self.metrics.cancelled += 1
                cut = sum(c.finish_reason == "cancelled" for c in result.candidates)
                self.metrics.last_cancelled = {
                    "generated_tokens": made,
                    "token_budget": n * max_new,
                    "trajectories_cut": cut,
                    "seconds": round(time.monotonic() - t0, 3),
                }
                if self.closing:  # stopped by the shutdown, not by its client: tell it why
                    job.post("error", _shutting_down())
                return
            self.metrics.completed += 1
        job.post("done", result)


# -- request parsing ---------------------------------------------------------------


def _content(value: object, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str) for p in value
    ):
        return "".join(p.get("text", "") for p in value)
    raise ApiError(
        400, f"messages[{i}].content: must be a string or a list of text parts", f"messages[{i}].content"
    )


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ApiError(400, "messages: required, a list of {role, content} objects", "messages")
    if not value:
        raise ApiError(400, "messages: the list is empty; send at least one message", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ApiError(
                400, f"messages[{i}].role: must be one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), i)})
    return out


def _number(req: dict, key: str, kind: type, lo: float, hi: float) -> float | int | None:
    value = req.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not lo <= value <= hi:
        what = "an integer" if kind is int else "a number"
        raise ApiError(400, f"{key} {_show(value)}: must be {what} from {lo} to {hi}", key)
    return kind(value)


def _search(req: dict, n: int) -> dict:
    """The ``edge_ms`` request extension: ``{"strategy": ..., "beam_width": ...}`` (both optional)."""
    ext = req.get("edge_ms")
    if ext is None:
        return {}
    if not isinstance(ext, dict) or set(ext) - {"strategy", "beam_width"}:
        raise ApiError(400, "edge_ms: must be an object with strategy and/or beam_width", "edge_ms")
    strategy = ext.get("strategy", "best")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ApiError(
            400, f"edge_ms.strategy {strategy!r}: unknown (choose from {', '.join(STRATEGIES)})", "edge_ms.strategy"
        )
    out = {"strategy": strategy}
    width = ext.get("beam_width")
    if width is not None:
        if strategy != "beam":
            raise ApiError(400, "edge_ms.beam_width: only with strategy beam", "edge_ms.beam_width")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= n:
            raise ApiError(400, f"edge_ms.beam_width {width!r}: must be an integer from 1 to {n}, the N of this "
                           "reasoning_effort", "edge_ms.beam_width")
        out["beam_width"] = width
    return out


def parse_request(body: bytes, n_ctx: int) -> dict:
    """Validate a ``/v1/chat/completions`` body; raises :class:`ApiError` (400) naming the bad field."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request body must be a JSON object")
    effort = "medium" if req.get("reasoning_effort") is None else req["reasoning_effort"]
    if not isinstance(effort, str) or effort not in MODES:
        raise ApiError(
            400, f"reasoning_effort {_show(effort)}: unknown (choose from {', '.join(MODES)})", "reasoning_effort"
        )
    key = "max_completion_tokens" if req.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(req, key, int, 1, n_ctx)
    if req.get("n") not in (None, 1):
        raise ApiError(
            400, "n: only one choice per request (the N trajectories are set by reasoning_effort)", "n"
        )
    if req.get("tools") or req.get("functions"):
        raise ApiError(400, "tools: tool calling is not supported", "tools")
    stop = req.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop: must be a string or a list of up to 4 non-empty strings", "stop")
    options = req.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: must be an object", "stream_options")
    sampling = {"stop": tuple(stops), "seed": _number(req, "seed", int, -(2**63), 2**63 - 1)}
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = _number(req, name, float, lo, hi)
        if value is not None:
            sampling[name] = value
    return dict(
        messages=_messages(req.get("messages")),
        mode=effort,
        max_tokens=max_tokens,
        sampling=sampling,
        stream=req.get("stream") is True,
        usage=options.get("include_usage") is True,
        search=_search(req, MODES[effort]),
    )


# -- responses ---------------------------------------------------------------------


def _number_or_null(x: float) -> float | None:
    # A broken head can score NaN; JSON has no NaN, and one would make the whole answer unreadable.
    return x if math.isfinite(x) else None


def _finish_reason(result: Result) -> str:
    return "length" if result.best.finish_reason == "length" else "stop"


def _usage(result: Result) -> dict:
    # Every token sampled, not only the selected trajectory's; a fork's shared prefix once.
    made = result.stats.generated_tokens
    n_prompt = len(result.prompt_token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": made, "total_tokens": n_prompt + made}


def _extension(result: Result) -> dict:
    """The ``edge_ms`` object: how every trajectory scored, and which one was selected."""
    s = result.stats
    cands = [
        dict(
            index=c.index,
            score=_number_or_null(c.score),  # the raw geometric mean of the step scores
            confidence=c.confidence,  # calibrated P(answer right); None when the head has no calibration
            step_scores=[_number_or_null(x) for x in c.step_scores],
            finish_reason=c.finish_reason,
            completion_tokens=len(c.token_ids),
            parent=c.parent,
            fork_at=c.fork_at,
        )
        for c in result.candidates
    ]
    timings = dict(decode_s=round(s.decode_s, 4), score_s=round(s.score_s, 4), total_s=round(s.total_s, 4))
    return dict(
        selected=result.selected,
        n=result.n,
        reasoning_effort=result.mode,
        seed=result.seed,
        strategy=result.strategy,
        confidence=result.confidence,
        answers=[asdict(a) for a in result.answers],
        candidates=cands,
        timings=timings,
    )


class _ClientGone(Exception):
    pass


async def _next(job: Job, request: Request | None) -> tuple[str, object]:
    """The worker's next message; with ``request``, gives up (_ClientGone) once its client is gone."""
    while True:
        try:
            return await asyncio.wait_for(job.inbox.get(), POLL_S)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                raise _ClientGone() from None


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


async def _json_body(request: Request) -> bytes:
    """The body of a JSON request, at most MAX_BODY_BYTES of it read."""
    ctype = request.headers.get("content-type", "")
    # Only application/json needs a CORS preflight: text/plain and form bodies a page may POST blind.
    if ctype.partition(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415, f"Content-Type {ctype or '(none)'}: send the body as application/json", code="unsupported_media_type"
        )
    too_large = ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


# -- who may ask -------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Which ``Host`` names the server answers to and which browser origins may read its answers."""

    hosts: frozenset[str]  # lower-case, no port; "*": any
    any_ip: bool  # listening on every interface: clients name it by one of its addresses
    origins: frozenset[str]  # "*": any

    @classmethod
    def of(cls, host: str, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = ()) -> Access:
        """For a server bound to ``host``: its loopback names, ``host`` itself and ``allowed_hosts``."""
        names = {*LOOPBACK_NAMES, *(h.strip().lower() for h in allowed_hosts)}
        everywhere = host in EVERY_INTERFACE
        names.add(socket.gethostname().lower() if everywhere else host.strip("[]").lower())
        return cls(frozenset(names), everywhere, frozenset(o.strip().rstrip("/") for o in cors_origins))

    def host_allowed(self, header: str) -> bool:
        # A DNS-rebinding page reaches the server under its own name, and the browser sends that
        # name in Host. An IP literal cannot be rebound.
        name = header.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else ""
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if not name:
            return False
        if "*" in self.hosts or name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/") in self.origins

    def refusal(self, headers: Headers) -> ApiError | None:
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return ApiError(
                403,
                f"Host {_show(host)}: not a name of this server (allow it with --allowed-host NAME)",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin):
            return ApiError(
                403,
                f"Origin {_show(origin)}: web pages from there may not use this server "
                "(allow them with --cors-origin ORIGIN)",
                code="origin_not_allowed",
            )
        return None


class _Guard:
    """ASGI middleware: refuse foreign Host names and origins; answer CORS for the allowed origins."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.access.refusal(headers)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            preflight = {
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": headers.get("access-control-request-headers", ""),
                "Access-Control-Max-Age": "600",
            }
            return await Response(status_code=204, headers={**cors, **preflight})(scope, receive, send)
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cors.items()]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


# -- the app -----------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's JSON format, whatever raised it."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, err: Exception) -> JSONResponse:
        # Starlette still logs the traceback after this answer is sent.
        return ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").response()


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")


def create_app(
    reasoner: Reasoner,
    queue_size: int = 16,
    api_key: str | None = None,
    model_id: str | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app serving ``reasoner``; ``queue_size`` requests may wait while one runs.

    ``host`` is the address it is bound to: requests must name it (or a loopback name, or one of
    ``allowed_hosts``) in ``Host``. Browser pages may use it only from ``cors_origins``.
    """
    check_settings(queue_size=queue_size, api_key=api_key)
    worker = Worker(reasoner, queue_size)
    model_id = model_id or reasoner.model.path.stem
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="edge_ms", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(_Guard, access=Access.of(host, tuple(allowed_hosts), tuple(cors_origins)))

    _add_error_handlers(app)

    def authorize(request: Request) -> None:
        _authorize(request, api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **worker.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "edge_ms"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(await _json_body(request), reasoner.model.n_ctx_train)
        job = Job(**req, loop=asyncio.get_running_loop(), inbox=asyncio.Queue())
        worker.submit(job)
        try:
            # Wait for the first message before answering, so that errors get a status code.
            first = await _next(job, request)
        except _ClientGone:
            worker.cancel(job)
            return Response(status_code=499)  # nobody reads it
        except BaseException:  # the server is shutting down
            worker.cancel(job)
            raise
        if first[0] == "error":
            raise first[1]
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        if not job.stream:
            return JSONResponse(reply.completion(first[1]))
        return StreamingResponse(
            _events(job, first, reply, worker), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


@dataclass(frozen=True)
class _Reply:
    """The parts every completion object of one request shares."""

    id: str
    created: int
    model: str

    def wrap(self, obj: str, choices: list, **extra) -> dict:
        return dict(id=self.id, object=obj, created=self.created, model=self.model, choices=choices, **extra)

    def completion(self, result: Result) -> dict:
        message = dict(role="assistant", content=result.answer, reasoning_content=result.best.reasoning or None)
        choice = dict(index=0, message=message, finish_reason=_finish_reason(result), logprobs=None)
        return self.wrap("chat.completion", [choice], usage=_usage(result), edge_ms=_extension(result))

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        choice = dict(index=0, delta=delta, finish_reason=finish, logprobs=None)
        return _sse(self.wrap("chat.completion.chunk", [choice], **extra))

    def last_chunks(self, result: Result, usage: bool) -> list[str]:
        out = []
        if result.best.reasoning:
            out.append(self.chunk({"reasoning_content": result.best.reasoning}))
        if result.answer:
            out.append(self.chunk({"content": result.answer}))
        out.append(self.chunk({}, _finish_reason(result), edge_ms=_extension(result)))
        if usage:
            out.append(_sse(self.wrap("chat.completion.chunk", [], usage=_usage(result))))
        return out


async def _events(job: Job, first: tuple[str, object], reply: _Reply, worker: Worker) -> AsyncIterator[str]:
    """The SSE stream of a job: progress, then the answer or an error event, then always [DONE]."""
    finished = False
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        kind, payload = first
        # Starlette cancels this generator when the client disconnects: the finally cancels the job.
        while kind == "progress":
            yield reply.chunk({}, edge_ms={"progress": payload})
            kind, payload = await _next(job, None)
        finished = True
        try:
            out = [_sse(payload.body())] if kind == "error" else reply.last_chunks(payload, job.usage)
        except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            log.exception("streaming the answer failed")
            out = [_sse(ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").body())]
        for text in out:
            yield text
        yield _sse("[DONE]")
    finally:
        if not finished:
            worker.cancel(job)


class _Uvicorn(uvicorn.Server):
    """uvicorn that says where it serves, and on shutdown answers the requests it holds at once."""

    def __init__(self, config: uvicorn.Config, worker: Worker, url: str) -> None:
        super().__init__(config)
        self.worker, self.url = worker, url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            logging.getLogger("uvicorn.error").info("serving on %s", self.url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Before uvicorn waits for connections to close: the waiting and running requests get their
        # 503 now (streams an error event and [DONE]), so nothing is cut off or left to time out.
        self.worker.close()
        await super().shutdown(sockets=sockets)


def serve(
    reasoner: Reasoner,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    queue_size: int = 16,
    log_level: str = "info",
    allowed_hosts: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
) -> None:
    """Serve ``reasoner`` until interrupted (Ctrl-C)."""
    check_settings(queue_size=queue_size, api_key=api_key, port=port)
    app = create_app(
        reasoner, queue_size=queue_size, api_key=api_key, host=host, allowed_hosts=allowed_hosts,
        cors_origins=cors_origins,
    )
    try:  # bind here, so a taken port is one clear error line and not a log dump
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except (OSError, OverflowError) as err:
        raise EdgeMSError(
            f"{host}:{port}: cannot listen there ({getattr(err, 'strerror', None) or err})"
        ) from None
    bound = sock.getsockname()[1]
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        _Uvicorn(config, app.state.worker, url).run(sockets=[sock])
    finally:
        # A second Ctrl-C skips the app's shutdown: the worker must still be done with the
        # reasoner before the caller frees it.
        app.state.worker.stop()
