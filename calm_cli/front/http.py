"""`calm serve`: an OpenAI-compatible HTTP front (Starlette on uvicorn) over the one loop every command shares.

A thin adapter: it checks the key and the body, turns an OpenAI request into a calm request, hands it to
`Calm.answer` on a thread of its own (the scheduler decides when and where it runs, batched with others), and
turns the record back into OpenAI's response shape, whole or as Server-Sent Events. The full record rides
along in the body's "calm" field (in the last chunk when streamed) and the chosen member in x-calm-* headers.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (ready once the encoder
is loaded; never needs the key), GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from calm_cli import bounded, schema
from calm_cli.front.metrics import Metrics
from calm_cli.loop.calm import Calm
from calm_cli.loop.execute.scheduler import Cancel

ROUTE_NAMES = ("calm", "auto")
FAILED = {"error": {"code": "internal", "message": "the answer failed"}, "model": None}  # the thread raised  # model names that mean: let calm route it
STATUS = {"bad_request": 400, "bad_json": 400, "bad_utf8": 400, "prompt_too_long": 400, "too_large": 413,
          "queue_full": 429, "model_failed": 502, "unavailable": 503, "timeout": 504, "internal": 500}


class HTTPError(Exception):
    """A request refused before the loop saw it, in OpenAI's error shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers or {}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def chat_query(messages: list[dict]) -> str:
    """One user turn for the member's one-turn prompt format: the last user message alone, or, with system
    messages or earlier turns, the conversation written out before it."""
    if messages[-1]["role"] != "user":
        raise HTTPError(400, "bad_request", "the last message must have role 'user'", "messages")
    if len(messages) == 1:
        return _text(messages[0]["content"])
    lines = []
    for message in messages[:-1]:
        label = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}[message["role"]]
        lines.append(f"{label}: {_text(message['content'])}")
    return "\n".join(lines) + f"\nUser: {_text(messages[-1]['content'])}"


def calm_request(body: dict, kind: str, members: list[str]) -> dict:
    """The calm request (schemas/request.schema.json) for a checked OpenAI body; 404 for an unknown model."""
    model = body["model"]
    if model not in ROUTE_NAMES and model not in members:
        raise HTTPError(404, "model_not_found", f"the model {model!r} does not exist: use 'calm' (routed) or "
                        f"a member ({', '.join(members)})", "model")
    if kind == "chat":
        query = chat_query(body["messages"])
    else:
        query = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
    if not query.strip():
        raise HTTPError(400, "bad_request", "the question is empty", "messages" if kind == "chat" else "prompt")
    request: dict[str, Any] = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                               "query": query}
    if model not in ROUTE_NAMES:
        request["model"] = model
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            request[key] = body[key]
    stop = body.get("stop")
    if stop:
        request["stop"] = [stop] if isinstance(stop, str) else stop
    found = schema.problems(request, "request.schema.json", "request")
    if found:  # the body's schema is as strict as the request's; this only guards that they stay in step
        raise HTTPError(400, "bad_request", found[0])
    return request


def finish_reason(record: dict) -> str:
    return "length" if record["metrics"]["stop_reason"] == "length" else "stop"


def usage(record: dict) -> dict:
    m = record["metrics"]
    return {"prompt_tokens": m["tokens_in"], "completion_tokens": m["tokens_out"],
            "total_tokens": m["tokens_in"] + m["tokens_out"]}


def calm_headers(record: dict | None, policy: str, model: str | None = None) -> dict[str, str]:
    headers = {"x-calm-policy": policy}
    model = model or (record or {}).get("model")
    if model:
        headers["x-calm-model"] = model
    escalated = ((record or {}).get("routing") or {}).get("escalated_from")
    if escalated:
        headers["x-calm-escalated-from"] = escalated
    return headers


class Server:
    """The app's state: the loop (once built), the metrics, the limits, and the threads requests wait on."""

    def __init__(self, make_calm: Callable[[], Calm], *, api_key: str, max_body: int,
                 log: Callable[[str], None] = lambda message: None):
        self.make_calm, self.api_key, self.max_body, self.log = make_calm, api_key, max_body, log
        self.calm: Calm | None = None
        self.failed: str | None = None
        self.metrics = Metrics(lambda: self.calm.stats() if self.calm else None)
        self.in_hand = 0
        self.metrics.in_flight.set_function(lambda: self.in_hand)
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    # -- lifecycle

    def _build(self) -> None:
        try:
            calm = self.make_calm()
        except Exception as exc:  # noqa: BLE001 - /health says why; the process stays up to say it
            self.failed = f"{type(exc).__name__}: {exc}"
            self.log(f"calm: cannot serve: {self.failed}")
            return
        self.pool = ThreadPoolExecutor(max_workers=int(calm.policy.queue.get("max_waiting", 512)),
                                       thread_name_prefix="calm-http")
        calm.prefetch()
        self.calm = calm
        self.log(f"calm: ready: policy {calm.policy.name}, members {', '.join(calm.members)}")

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        builder = threading.Thread(target=self._build, name="calm-build", daemon=True)
        builder.start()  # the port opens at once; /health says when the loop is ready
        try:
            yield
        finally:  # uvicorn has stopped accepting and finished the requests in hand (SIGTERM's drain)
            await asyncio.get_running_loop().run_in_executor(None, builder.join)
            if self.calm is not None:
                self.calm.close(drain=True)
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    # -- checks

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def _ready(self) -> Calm:
        if self.calm is None:
            raise HTTPError(503, "unavailable", self.failed or "calm is still loading its encoder and members",
                            headers={"Retry-After": "5"})
        return self.calm

    async def _body(self, request: Request, schema_name: str) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise HTTPError(413, "too_large", f"the body has {length} bytes, over CALM_MAX_BODY {self.max_body}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise HTTPError(413, "too_large", f"the body is over CALM_MAX_BODY {self.max_body} bytes")
        try:
            data = bounded.loads_json(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise HTTPError(400, "bad_utf8", f"the body is not valid UTF-8 (byte {exc.start})") from None
        except bounded.Refused as exc:
            raise HTTPError(400, "bad_json", f"the body is not acceptable JSON: {exc}") from None
        found = schema.problems(data, schema_name, "body")
        if found:
            where, _, what = found[0].removeprefix("body: ").partition(": ")
            raise HTTPError(400, "bad_request", found[0], None if where == "(top level)" else where)
        return data

    # -- routes

    async def health(self, request: Request) -> Response:
        if self.calm is None:
            return JSONResponse({"status": "failed" if self.failed else "loading", "detail": self.failed},
                                status_code=503)
        return JSONResponse({"status": "ok", "policy": self.calm.policy.name})

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        calm = self._ready()
        created = int(time.time())
        data = [{"id": "calm", "object": "model", "created": created, "owned_by": "calm",
                 "description": f"routed by policy {calm.policy.name}"}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "calm",
                  "description": member.config.description} for name, member in calm.members.items()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "text")

    async def _complete(self, request: Request, kind: str) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            calm = self._ready()
            body = await self._body(request, "chat-request.schema.json" if kind == "chat"
                                    else "completion-request.schema.json")
            req = calm_request(body, kind, list(calm.members))
            with self.lock:
                if self.in_hand >= int(calm.policy.queue.get("max_waiting", 512)):
                    raise HTTPError(429, "queue_full", f"{self.in_hand} requests are already in hand "
                                    "(queue.max_waiting)", headers={"Retry-After": "1"})
                self.in_hand += 1
        except HTTPError as exc:
            self.metrics.refused(endpoint, exc.code)
            return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            if body.get("stream"):
                return await self._stream(request, calm, req, kind, endpoint,
                                          bool((body.get("stream_options") or {}).get("include_usage")))
            return await self._whole(request, calm, req, kind, endpoint)
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        with self.lock:
            self.in_hand -= 1

    def _submit(self, calm: Calm, req: dict, cancel: Cancel, on_text: Callable[[str], None] | None = None,
                on_final: Callable[[str], None] | None = None) -> asyncio.Future:
        assert self.pool is not None
        timeout_s = calm.policy.queue.get("timeout_s")
        return asyncio.wrap_future(self.pool.submit(calm.answer, req, 0.0, on_text, timeout_s, cancel, on_final))

    async def _whole(self, request: Request, calm: Calm, req: dict, kind: str, endpoint: str) -> Response:
        cancel = Cancel()
        answer = self._submit(calm, req, cancel)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([answer, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():  # the client went away: give the request up, and still count it
                cancel()
            record = await answer
        finally:
            watcher.cancel()
            self._done()
        self.metrics.observe(endpoint, record)
        headers = calm_headers(record, calm.policy.name)
        if record["error"]:
            error = record["error"]
            return error_response(STATUS.get(error["code"], 500), error["code"], error["message"], None, headers)
        body = response_body(req["id"], kind, record)
        return JSONResponse(body, headers=headers)

    async def _stream(self, request: Request, calm: Calm, req: dict, kind: str, endpoint: str,
                      include_usage: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = Cancel()

        def push(kind_: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind_, value))

        answer = self._submit(calm, req, cancel, lambda piece: push("text", piece),
                              lambda member: push("member", member))
        answer.add_done_callback(lambda f: events.put_nowait(("record", f.result() if not f.exception()
                                                                else None)))
        # Headers go out with the first byte: wait until the answering member is known (or it failed).
        held: list[str] = []
        member: str | None = None
        record: dict | None = None
        while member is None and record is None:
            what, value = await events.get()
            if what == "member":
                member = value
            elif what == "text":
                held.append(value)
            else:
                record = value
        if record is not None and (record.get("error") if record else True):
            self._done()
            record = record or FAILED
            self.metrics.observe(endpoint, record)
            error = record["error"]
            return error_response(STATUS.get(error["code"], 500), error["code"], error["message"], None,
                                  calm_headers(record, calm.policy.name))
        headers = calm_headers(record, calm.policy.name, member or (record or {}).get("model"))
        created, model = int(time.time()), headers.get("x-calm-model", "calm")

        def chunk(delta: str | None, finish: str | None = None, extra: dict | None = None,
                  first: bool = False, no_choice: bool = False) -> str:
            if no_choice:  # stream_options.include_usage's last chunk: usage and no choice
                choice, obj = None, "chat.completion.chunk" if kind == "chat" else "text_completion"
            elif kind == "chat":
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                    ({"content": delta} if delta is not None else {})
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            body = {"id": req["id"], "object": obj, "created": created, "model": model,
                    "choices": [] if choice is None else [choice]}
            return f"data: {json.dumps(body | (extra or {}), ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            final: dict | None = record
            finished = False
            try:
                if kind == "chat":
                    yield chunk(None, first=True)
                for piece in held:
                    yield chunk(piece)
                while final is None:
                    what, value = await events.get()
                    if what == "text":
                        yield chunk(value)
                    elif what == "record":
                        final = value
                final = final or FAILED
                self.metrics.observe(endpoint, final)
                if final["error"]:  # failed after the stream began: say so in-band, as OpenAI does
                    yield f"data: {json.dumps({'error': final['error'] | {'type': 'server_error'}})}\n\n"
                else:
                    extra = {"usage": usage(final), "calm": final}
                    yield chunk(None, finish_reason(final), extra)
                    if include_usage:
                        yield chunk(None, extra={"usage": usage(final)}, no_choice=True)
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away mid-stream: free its place in the batch
                    cancel()
                self._done()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers=headers | {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (http.disconnect), for a request whose body was read."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def response_body(request_id: str, kind: str, record: dict) -> dict:
    created = int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": record["answer"]}, "logprobs": None,
                  "finish_reason": finish_reason(record)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": record["answer"], "logprobs": None, "finish_reason": finish_reason(record)}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": record["model"], "choices": [choice],
            "usage": usage(record), "calm": record}


def create_app(server: Server) -> RequireKey:
    routes = [Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_route, methods=["GET"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"])]

    async def http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")

    app = Starlette(routes=routes, lifespan=server.lifespan,
                    exception_handlers={HTTPError: http_error, 404: not_found, 405: bad_method})
    return RequireKey(app, server)


class RequireKey:
    """ASGI middleware: with CALM_API_KEY set, every route but /health needs it as a bearer key. (Plain ASGI,
    not BaseHTTPMiddleware, which would buffer streamed answers and hide client disconnects.)"""

    def __init__(self, app: Starlette, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not self.server._authorized(Request(scope)):
            self.server.metrics.refused("auth", "unauthorized")
            response = error_response(401, "invalid_api_key", "a valid bearer key is required (Authorization: "
                                      "Bearer KEY; the server's CALM_API_KEY)")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def serve(make_calm: Callable[[], Calm], host: str, port: int, *, api_key: str, max_body: int,
          log: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM: uvicorn stops accepting, finishes the requests in hand, then the loop
    drains and unloads."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would end killed by
        the signal; calm drained everything it took, so it exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    server = Server(make_calm, api_key=api_key, max_body=max_body, log=log)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_keep_alive=5)
    log(f"calm: listening on http://{host}:{port} (OpenAI API under /v1; /health, /metrics)")
    Uvicorn(config).run()
