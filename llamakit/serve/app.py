"""The HTTP layer: OpenAI's routes over the Scheduler, with no model logic of its own.

Requests are validated (pydantic), turned into Jobs (token ids, sampling settings, stops), submitted,
and their events turned back into OpenAI's response and chunk shapes. Streams are Server-Sent Events;
a client that leaves has its jobs cancelled, which frees their KV-cache slots within a step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamakit.errors import LlamakitError
from llamakit.generate.sampling import SamplingParams
from llamakit.guard import Guard
from llamakit.serve import moderation
from llamakit.serve.metrics import Metrics
from llamakit.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from llamakit.serve.responses import Choice, TokenTexts, chat_chunk, chat_response, completion_chunk, completion_response
from llamakit.serve.scheduler import Delta, Failed, Finished, Job, QueueFull, Scheduler
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import ChatFormatError, encode_dialog, has_special_tags, stop_ids_for

log = logging.getLogger(__name__)

OPEN_ROUTES = ("/health", "/")  # no key needed: liveness, and the chat page (static; it asks for the key)


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


@dataclass
class ServerState:
    """What the routes share; `scheduler` is None until the model has loaded."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Scheduler | None = None
    tokenizer: Tokenizer | None = None
    chat_style: str | None = None
    token_texts: TokenTexts | None = None
    guard: Guard | None = None  # --guard: checks prompts and responses (serve/moderation.py)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llamakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llamakit = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_Guard, state=state)

    @app.get("/health")
    async def health():
        ready = state.scheduler is not None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        scheduler = _ready(state)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llamakit", "max_model_len": scheduler.max_seq_len}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("llamakit.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(state, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _complete(state, request, body, chat=True)

    return app


class _Guard:
    """ASGI middleware, per request: the API key (constant-time compare), the body size limit (the body is read
    here, at most max_body_bytes of it, then replayed to the route), and the request counter."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, headers = scope["path"], dict(scope["headers"])
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._refuse(route, headers)
        if refusal is None and scope["method"] == "POST":
            body, refusal = await self._read_body(receive)
            receive = _replay(body, receive)
        await (refusal or self.app)(scope, receive, counted_send)
        if route.startswith("/v1/"):
            self.state.metrics.requests.labels(route, str(status["code"])).inc()

    def _refuse(self, route: str, headers: dict) -> Response | None:
        if self.expected is not None and route not in OPEN_ROUTES and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            return _error(401, "Incorrect or missing API key; pass it as 'Authorization: Bearer KEY'",
                          "authentication_error", "invalid_api_key")
        size = headers.get(b"content-length", b"0")
        if not size.isdigit() or int(size) > self.state.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive) -> tuple[bytes, Response | None]:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.state.max_body_bytes:  # a chunked body with no (or a false) content-length
                return b"", self._too_large()
            more = message.get("more_body", False)
        return b"".join(chunks), None

    def _too_large(self) -> Response:
        return _error(413, f"the request body is larger than {self.state.max_body_bytes} bytes; send less, or start "
                      "the server with a larger --max-body-size")


def _replay(body: bytes, receive):
    """A receive() that gives the body already read, then what the client sends next (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


async def _api_error(_request: Request, e: APIError) -> JSONResponse:
    return _error(e.status, e.message, e.kind, e.code, e.param)


async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return _error(400, f"{where or 'body'}: {first['msg']}", param=where or None)


def _ready(state: ServerState) -> Scheduler:
    if state.scheduler is None:
        raise APIError(503, "the model is still loading; retry shortly", "service_unavailable")
    return state.scheduler


async def _complete(state: ServerState, request: Request, body: SamplingFields, chat: bool):
    scheduler = _ready(state)
    if body.model != state.model_name:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{state.model_name}`",
                       code="model_not_found", param="model")
    prompts = _chat_prompt(state, body) if chat else _completion_prompts(state, body)
    moderate = await _guard(state, body, prompts, chat) if state.guard is not None else None
    jobs, events = _jobs(state, scheduler, body, prompts, chat)
    try:
        scheduler.submit(jobs)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", "too_many_waiting") from None
    ids = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    run = _Run(ids, state, scheduler, jobs, events, [len(p) for p in prompts], body, chat, moderate)
    if body.stream:
        return StreamingResponse(run.stream(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.collect(request)


def _completion_prompts(state: ServerState, body: CompletionRequest) -> list[list[int]]:
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    p = body.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty; give some text or token ids", param="prompt")
    if all(isinstance(x, int) for x in p):
        p = [p]
    prompts = [state.tokenizer.encode(x, bos=True) if isinstance(x, str) else list(x) for x in p]
    vocab = state.tokenizer.vocab_size
    for ids in prompts:
        if not ids:
            raise APIError(400, "a prompt is empty; give some text or token ids", param="prompt")
        if max(ids) >= vocab:
            raise APIError(400, f"token id {max(ids)} is out of range for a {vocab}-token vocabulary", param="prompt")
    return prompts


def _dialog(body: ChatCompletionRequest) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[list[int]]:
    dialog = _dialog(body)
    if state.chat_style == "llama2" and has_special_tags(dialog):
        raise APIError(400, "a message contains a Llama 2 turn tag ([INST], <<SYS>>, ...), which could forge a turn "
                       "in this model's chat format; remove it", param="messages")
    try:
        return [encode_dialog(state.tokenizer, dialog, state.chat_style)]
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None


async def _guard(state: ServerState, body: SamplingFields, prompts: list[list[int]], chat: bool):
    """Refuse a prompt the guard finds unsafe (400); else return the check to run on the responses."""
    if chat:
        conversations = [moderation.chat_conversation(_dialog(body))]
    else:
        bos = state.tokenizer.bos_id
        conversations = moderation.prompt_conversations(
            [state.tokenizer.decode(p[1:] if p[0] == bos else p) for p in prompts])
    reason = await moderation.refusal(state.guard, conversations)
    if reason is not None:
        raise APIError(400, reason, code=moderation.REFUSAL_CODE, param="messages" if chat else "prompt")
    return lambda choices: moderation.moderate(state.guard, conversations, choices)


def _jobs(state: ServerState, scheduler: Scheduler, body: SamplingFields, prompts: list[list[int]], chat: bool
          ) -> tuple[list[Job], asyncio.Queue]:
    """One Job per prompt and choice, emitting (job index, event) into one queue on this event loop."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    stop_ids = frozenset() if body.ignore_eos else (
        stop_ids_for(state.tokenizer, state.chat_style) if chat else state.tokenizer.stop_ids)
    jobs = []
    for prompt in prompts:
        max_tokens = _max_tokens(body, len(prompt), scheduler.max_seq_len, chat)
        for j in range(body.n):
            index = len(jobs)
            jobs.append(Job(prompt, _params(body, j), max_tokens,
                            emit=lambda event, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, event)),
                            stop_ids=stop_ids, stop_strings=body.stop_strings(), follows_prompt=not chat,
                            logprobs=_wants_logprobs(body), top_logprobs=_top_logprobs(body),
                            min_tokens=body.min_tokens))
    return jobs, events


def _params(body: SamplingFields, choice: int) -> SamplingParams:
    try:
        return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                              min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              seed=None if body.seed is None else body.seed + choice)  # n choices differ
    except LlamakitError as e:
        raise APIError(400, str(e)) from None


def _max_tokens(body: SamplingFields, prompt_len: int, window: int, chat: bool) -> int:
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is None and chat:
        asked = window - prompt_len
    if prompt_len >= window or prompt_len + asked > window:
        raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                       f"{prompt_len + max(asked, 0)} tokens ({prompt_len} in the prompt, {max(asked, 0)} for the "
                       "completion). Please reduce the length of the prompt or of the completion.",
                       code="context_length_exceeded", param="messages" if chat else "prompt")
    if body.min_tokens > asked:
        raise APIError(400, f"min_tokens={body.min_tokens} is more than max_tokens={asked}", param="min_tokens")
    return asked


def _wants_logprobs(body: SamplingFields) -> bool:
    return bool(body.logprobs) if isinstance(body, ChatCompletionRequest) else body.logprobs is not None


def _top_logprobs(body: SamplingFields) -> int:
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return body.top_logprobs or 0
    return body.logprobs or 0


class _Run:
    """One HTTP request's jobs in flight: their events, gathered into a response or a stream of chunks."""

    def __init__(self, id_: str, state: ServerState, scheduler: Scheduler, jobs: list[Job], events: asyncio.Queue,
                 prompt_lens: list[int], body: SamplingFields, chat: bool, moderate=None):
        self.id, self.state, self.scheduler, self.jobs, self.events = id_, state, scheduler, jobs, events
        self.moderate = moderate  # None, or a coroutine function that withholds unsafe choices
        self.body, self.chat, self.created = body, chat, int(time.time())
        self.prompt_tokens = sum(prompt_lens)
        self.choices = [Choice(i, state.token_texts, job.logprobs) for i, job in enumerate(jobs)]
        self.start, self.first_token_at = time.perf_counter(), None

    async def _events(self, request: Request) -> AsyncIterator[tuple[int, object]]:
        """Events until every job is done; a client that leaves cancels what is left."""
        watcher = asyncio.create_task(self._watch(request))
        open_jobs = len(self.jobs)
        try:
            while open_jobs:
                index, event = await self.events.get()
                if event is None:  # the client left
                    return
                if isinstance(event, Delta) and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                if isinstance(event, Finished | Failed):
                    open_jobs -= 1
                yield index, event
        finally:
            watcher.cancel()
            for job in self.jobs:
                self.scheduler.cancel(job)  # a no-op for finished jobs; frees the slots of a client that left
            self._log()

    async def _watch(self, request: Request) -> None:
        """Wait for the client to disconnect (the body is read already, so that is all receive() can say)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait((None, None))

    async def collect(self, request: Request) -> JSONResponse:
        async for index, event in self._events(request):
            self._apply(index, event)
        if self.moderate is not None:
            await self.moderate(self.choices)
        failed = [c.error for c in self.choices if c.error]
        if failed:
            raise APIError(500, failed[0], "server_error")
        usage = self._usage()
        build = chat_response if self.chat else completion_response
        return JSONResponse(build(self.id, self.created, self.state.model_name, self.choices, usage))

    async def stream(self, request: Request) -> AsyncIterator[str]:
        build = chat_chunk if self.chat else completion_chunk
        if self.chat:  # the first chunk of each choice names the role
            for c in self.choices:
                yield _sse(build(self.id, self.created, self.state.model_name, c.index, role="assistant"))
        async for index, event in self._events(request) if self.moderate is None else self._held(request):
            choice = self.choices[index]
            self._apply(index, event)
            if isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error"))
                return
            if isinstance(event, Delta) and (event.text or (choice.logprobs and event.tokens)):
                yield _sse(build(self.id, self.created, self.state.model_name, index, text=event.text,
                                 logprobs=choice.logprobs_for(event.tokens, self.chat)))
            elif isinstance(event, Finished):
                yield _sse(build(self.id, self.created, self.state.model_name, index, text="",
                                 finish_reason=event.finish_reason))
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield _sse({**build(self.id, self.created, self.state.model_name, None), "usage": self._usage()})
        yield "data: [DONE]\n\n"

    async def _held(self, request: Request) -> AsyncIterator[tuple[int, object]]:
        """With a guard: every event first (nothing is sent before the guard has read the whole response), then
        each moderated choice as one Delta and its Finished (or its Failed)."""
        async for index, event in self._events(request):
            self._apply(index, event)
        if any(c.finish_reason is None and c.error is None for c in self.choices):
            return  # the client left: nothing to check or send
        await self.moderate(self.choices)
        for c in self.choices:
            if c.error is not None:
                yield c.index, Failed(c.error)
                continue
            text, tokens, completion_tokens = c.text, c.tokens, c.completion_tokens
            c.text, c.tokens = "", []
            yield c.index, Delta(text, tokens)
            yield c.index, Finished(c.finish_reason, 0, completion_tokens)

    def _apply(self, index: int, event) -> None:
        choice = self.choices[index]
        if isinstance(event, Delta):  # one per sampled token: counted even if the client leaves before the end
            choice.text += event.text
            choice.tokens += event.tokens
            choice.completion_tokens += 1
        elif isinstance(event, Finished):
            choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
        elif isinstance(event, Failed):
            choice.error = event.message

    def _usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _log(self) -> None:
        now = time.perf_counter()
        ttft = f"{self.first_token_at - self.start:.3f} s" if self.first_token_at else "-"
        reasons = ",".join(c.finish_reason or ("error" if c.error else "cancelled") for c in self.choices)
        log.info("%s: %d prompt tokens, %d completion tokens, first token %s, total %.3f s, finish %s", self.id,
                 self.prompt_tokens, sum(c.completion_tokens for c in self.choices), ttft, now - self.start, reasons)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
