"""An OpenAI-compatible HTTP server on the generation engine: chat, completions, NER and a web page.

    python predict.py --serve --config configs/msra_baichuan7b.yaml --lora_model checkpoint/baichuan/adapter_model

One engine thread runs `Engine.run` over a `Feed` for the server's whole life, so concurrent
requests are decoded together (continuous batching); each row attends only to its own cache
slot, so a greedy answer is the one the request would get alone. HTTP is FastAPI on uvicorn; the
event loop tokenises, validates, hands requests to the feed and turns the engine's tokens (given
to it with `call_soon_threadsafe`) into text.

Decisions where the OpenAI API and the model disagree (docs/predict.md, "Serving"):
- The model is single-turn (one instruction + input). A chat request is at most one system
  message followed by one user message: the system message is the instruction and the user
  message its input; without a system message the server's --instruct (and --query_prefix) is
  the instruction, and without that the user message is the instruction, as in the terminal chat.
  Earlier turns are refused (400) rather than folded into a prompt the model never saw in training.
- /v1/completions is raw text completion: the prompt is not wrapped in the template.
- Omitted sampling fields take the server's generation options (greedy by default);
  temperature 0 is greedy.
- /v1/ner is always grounded: an answer lists only strings of the text. Offsets are in Unicode
  code points, end exclusive; every occurrence of an answered entity string is a mention, longer
  entities claim their characters first (北京大学 before the 北京 inside it) and mentions never
  overlap; an answered entity left without a free occurrence is listed under `unplaced`.
"""

import asyncio
import functools
import hmac
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import opt
from .errors import UserError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_STOPS = 4


@dataclass
class ServeArgs:
    """Serving (predict.py --serve)"""

    serve: bool = opt(False, "serve the model over HTTP: an OpenAI-compatible API (/v1/chat/completions, "
                      "/v1/completions, /v1/models), /v1/ner, /health and a web page at /")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface; set --api_key then)")
    port: int = opt(8000, "port to listen on (0: any free port, printed at start)")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/*; @FILE reads the key from FILE "
                              "(keeps it out of the process list)")
    served_model_name: str | None = opt(None, "the model id clients send and /v1/models lists; default: the "
                                        "adapter's (else the base model's) folder name")
    max_context: int = opt(1024, "longest prompt + answer in tokens a request may have (sizes the KV cache)")
    max_tokens_limit: int = opt(1024, "largest max_tokens a request may ask for (omitted: --max_new_tokens)")
    max_queue: int = opt(256, "requests that may wait for a free KV-cache slot; more get 429")
    max_body_bytes: int = opt(1 << 20, "largest request body in bytes; larger get 413")
    drain_timeout: float = opt(30.0, "seconds Ctrl-C/SIGTERM waits for running requests before cancelling them")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {self.port}.")
        for name in ("max_context", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1.")
        if self.max_queue < 0:
            raise UserError("--max_queue must be at least 0.")
        if not self.drain_timeout >= 0:
            raise UserError("--drain_timeout must be at least 0 seconds.")


def read_api_key(value: str | None) -> str | None:
    """The key itself, or the first line of @FILE; an unreadable or empty file is the user's to fix."""
    if value is None:
        return None
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise UserError(f"--api_key {value}: cannot read {path} ({e.strerror}).") from None
        except UnicodeDecodeError:
            raise UserError(f"--api_key {value}: {path} is not UTF-8 text.") from None
        if not key:
            raise UserError(f"--api_key {value}: {path} is empty; put the key on its first line.")
    else:
        key = value.strip()
    if not key:
        raise UserError("--api_key is empty; give a key, or leave the option out to serve without one.")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise UserError("--api_key must not contain spaces or control characters (it travels in an HTTP header).")
    return key


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so that a taken port fails in a second."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror}).") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise UserError(f"port {port} on {host} is already in use; stop what listens there or pick another "
                            "--port (0: any free one).") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- one request


class Job:
    """One request's answer as it grows: tokens from the engine, text, stop strings, finish reason.

    Lives in the event loop's thread; the engine thread reaches it only through
    call_soon_threadsafe, so the tokens arrive in order and before the end.
    """

    def __init__(self, service: "Service", request, prompt_tokens: int, stops: Sequence[str],
                 stream: bool = False) -> None:
        self.service = service
        self.request = request
        self.prompt_tokens = prompt_tokens
        self.stops = [s for s in stops if s]
        # Only a stream or a stop string needs the text as it grows; an answer sent whole is decoded
        # once at the end, and its tokens never wake the event loop (nor take the GIL from the engine).
        self.wants_tokens = stream or bool(self.stops)
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.changed = asyncio.Event()
        self.error: str | None = None
        self.abandoned = False  # its client left before the answer was done
        # incremental detokenisation: text of tokens[prefix:read] is already in self.text
        self._prefix = self._read = 0

    def cancel(self, abandoned: bool = False) -> None:
        self.abandoned = self.abandoned or abandoned
        self.request.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def push(self, token: int) -> None:
        if self.done:
            return  # after a stop string: the engine is told to stop, a token or two may still come
        self.tokens.append(token)
        decode = self.service.decode
        before = decode(self.tokens[self._prefix:self._read])
        after = decode(self.tokens[self._prefix:])
        # A character split over tokens (byte fallback) decodes to U+FFFD until it is whole.
        if len(after) > len(before) and not after.endswith("\ufffd"):
            old = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            self._check_stop(old)
        self.changed.set()

    def _check_stop(self, old: int) -> None:
        if not self.stops:
            return
        longest = max(map(len, self.stops))
        start = max(0, old - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            self.completion_tokens = len(self.tokens)
            self.cancel()

    def end(self, tokens: list[int]) -> None:
        """The engine is done with it: the text of all its tokens is the answer (unless a stop string cut it)."""
        if self.done:
            self.changed.set()
            return
        self.tokens = list(tokens)
        self.text = self.service.decode(self.tokens)
        self._check_stop(0)
        if self.finish_reason is None:
            self.completion_tokens = len(self.tokens)
            self.finish_reason = "length" if len(self.tokens) >= self.request.max_new_tokens else "stop"
        self.changed.set()

    def fail(self, message: str) -> None:
        if not self.done:
            self.error = message
        self.changed.set()

    def safe_text(self) -> str:
        """What may be sent now: not the tail that could still become a stop string."""
        if self.done or not self.stops:
            return self.text
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self.text[:len(self.text) - hold]

    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens if self.done else len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


# --------------------------------------------------------------------------- the service


class Service:
    """The model, its engine thread and what HTTP needs from them (no HTTP here)."""

    def __init__(self, loaded, args, gen, serve_args: ServeArgs, types: list[str] | None = None,
                 stop_ids: Sequence[int] | None = None, model_name: str | None = None) -> None:
        from .engine import Engine, Feed, Sampling
        from .generation import engine_reason, stop_token_ids

        reason = engine_reason(loaded.model, gen)
        if reason is not None:
            raise UserError(f"the server decodes with the generation engine, which cannot be used here: {reason}.")
        self.loaded, self.args, self.gen, self.serve_args = loaded, args, gen, serve_args
        self.tokenizer = loaded.tokenizer
        self.types = list(types or [])
        self.model_name = model_name or default_model_name(args, loaded)
        self.api_key = read_api_key(serve_args.api_key)
        ids = list(stop_token_ids(loaded.tokenizer, loaded.model)) if stop_ids is None else list(stop_ids)
        pad = loaded.tokenizer.pad_token_id
        self.engine = Engine(loaded.model, ids, pad if pad is not None else (ids[0] if ids else 0),
                             max_batch=gen.batch_size,
                             sampling=Sampling(gen.do_sample, gen.temperature, gen.top_k, gen.top_p))
        self.max_len = serve_args.max_context
        self.feed = Feed()  # bounded by capacity() in submit: the engine drains the feed at every step
        self.jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._shared: dict = {}  # grounded decoding's per-tokenizer context, built once
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.draining = False
        self.failure: str | None = None
        self.started = int(time.time())
        self.counts = {"completed": 0, "cancelled": 0, "rejected_full": 0}

    # ------------------------------------------------------------- engine thread

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="cnqlora-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for index, tokens in self.engine.run(self.feed, on_token=self._on_token, max_len=self.max_len):
                with self._lock:
                    job = self.jobs.pop(index, None)
                if job is None:
                    continue
                self.counts["cancelled" if job.abandoned else "completed"] += 1
                self._call(job.end, tokens)
        except BaseException as e:  # noqa: BLE001 - every waiting client must hear of it
            self.failure = f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
            with self._lock:
                jobs, self.jobs = list(self.jobs.values()), {}
            for job in jobs:
                self._call(job.fail, "the generation engine failed; see the server's log")

    def _on_token(self, index: int, token: int) -> None:
        with self._lock:
            job = self.jobs.get(index)
        if job is not None and job.wants_tokens:
            self._call(job.push, token)

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def capacity(self) -> int:
        """Requests that may be held at once: the cache's slots plus --max_queue waiting for one."""
        slots = self.engine.last_stats.get("slots") or self.engine.max_batch
        return slots + self.serve_args.max_queue

    def submit(self, prompt: list[int], max_tokens: int, stops: Sequence[str] = (), sampling=None,
               seed: int | None = None, constraint=None, stream: bool = False) -> Job:
        from .engine import Closed, Request

        if self.failure is not None:
            raise ApiError(503, "the generation engine has failed; restart the server", "engine_failed")
        if self.draining:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        request = Request(prompt, max_tokens, constraint=constraint, sampling=sampling, seed=seed)
        job = Job(self, request, len(prompt), stops, stream)
        with self._lock:
            if len(self.jobs) >= self.capacity():
                self.counts["rejected_full"] += 1
                raise ApiError(429, f"the server is full ({len(self.jobs)} requests running or waiting); retry "
                               "later", "queue_full", headers={"Retry-After": "1"})
            try:
                index = self.feed.put(request)
            except Closed:
                raise ApiError(503, "the server is shutting down", "shutting_down") from None
            self.jobs[index] = job
        return job

    def close(self, timeout: float) -> None:
        """Drain: refuse new requests, let running ones finish for `timeout` s, then cancel the rest."""
        self.draining = True
        self.feed.close()
        if self.thread is None:
            return
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self._lock:
                for job in self.jobs.values():
                    job.cancel(abandoned=True)
            self.thread.join(10)

    # ------------------------------------------------------------- text and prompts

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True) if tokens else ""

    def health(self) -> dict[str, Any]:
        with self._lock:
            running = len(self.jobs)
        status = "error" if self.failure else "draining" if self.draining else "ok"
        return {"status": status, "model": self.model_name, "requests": running, "waiting": self.feed.waiting(),
                "slots": self.engine.last_stats.get("slots"), "capacity": self.capacity(),
                "max_context": self.max_len, **self.counts, **({"error": self.failure} if self.failure else {})}


def default_model_name(args, loaded) -> str:
    if args.model_name:
        return args.model_name
    path = args.lora_model or getattr(loaded.model, "name_or_path", None) or "model"
    return os.path.basename(os.path.normpath(str(path))) or "model"


# --------------------------------------------------------------------------- request bodies


def _schemas():
    """The request models (pydantic comes with FastAPI; built on first use to keep imports light)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Open(BaseModel):
        # OpenAI clients send fields this server does not use (user, logit_bias=None, ...)
        model_config = ConfigDict(extra="allow")

    class Sampled(Open):
        model: str | None = None
        stream: bool = False
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, lt=2**63)  # what a torch generator takes
        n: int = Field(1, ge=1)
        stream_options: dict[str, Any] | None = None
        frequency_penalty: float | None = None
        presence_penalty: float | None = None
        logprobs: Any = None

    class Part(Open):
        type: str
        text: str | None = None

    class Message(Open):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[Part] | None = None

    class Chat(Sampled):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class Completion(Sampled):
        prompt: str | list[str]
        echo: bool = False
        suffix: str | None = None

    class Ner(Open):
        model: str | None = None
        text: str = Field(min_length=1)
        types: list[str] | None = None
        max_tokens: int | None = Field(None, ge=1)

    return {"chat": Chat, "completion": Completion, "ner": Ner}


_SCHEMAS: dict[str, Any] = {}


def parse_body(kind: str, data: Any):
    from pydantic import ValidationError

    if not _SCHEMAS:
        _SCHEMAS.update(_schemas())
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        return _SCHEMAS[kind].model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ApiError(422, f"{where}: {first['msg']}{more}", "invalid_value", param=where) from None


def message_text(message) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"content parts of type {part.type!r} are not supported: this model reads text",
                           "unsupported_content", param="messages")
        texts.append(part.text)
    return "".join(texts)


def chat_item(service: "Service", messages) -> Any:
    """The (instruction, input) of a chat: see the module docstring."""
    from .inference import Item, _typed_item

    roles = [m.role for m in messages]
    system = [m for m in messages if m.role in ("system", "developer")]
    if roles[-1] != "user":
        raise ApiError(400, "the last message must be the user's: it is the one answered", "invalid_messages",
                       param="messages")
    if roles.count("user") > 1 or any(r in ("assistant", "tool") for r in roles) or len(system) > 1 or \
            (system and roles[0] not in ("system", "developer")):
        raise ApiError(400, "this model is single-turn (trained on one instruction and one input): send one user "
                       "message, after at most one system message (the instruction)", "multi_turn_unsupported",
                       param="messages")
    text = message_text(messages[-1])
    if not text.strip():
        raise ApiError(400, "the user message is empty", "invalid_messages", param="messages")
    if system:
        return Item(message_text(system[0]), text, None)
    return _typed_item(text, service.args)


def check_model(service: "Service", model: str | None) -> None:
    if model is not None and model != service.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                       "model_not_found", param="model")


def _stops(body) -> list[str]:
    stop = body.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop sequences", "invalid_value", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "a stop sequence must not be empty", "invalid_value", param="stop")
    return stops


def _sampling(service: "Service", body):
    from .engine import Sampling

    if body.n != 1:
        raise ApiError(400, "n must be 1 (ask again for another answer)", "invalid_value", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported (it would discourage copying entities from the input)",
                           "unsupported_parameter", param=name)
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", "unsupported_parameter", param="logprobs")
    gen = service.gen
    temperature = gen.temperature if body.temperature is None else body.temperature
    do_sample = gen.do_sample if body.temperature is None else body.temperature > 0
    top_p = gen.top_p if body.top_p is None else body.top_p
    top_k = gen.top_k if body.top_k is None else body.top_k
    return Sampling(do_sample, temperature, top_k, top_p)


def _max_tokens(service: "Service", asked: int | None, prompt_tokens: int) -> int:
    limit = service.serve_args.max_tokens_limit
    room = service.max_len - prompt_tokens
    if asked is not None and asked > limit:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limit} (--max_tokens_limit)",
                       "invalid_value", param="max_tokens")
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; with max_tokens {asked or 1} it exceeds this "
                       f"server's context of {service.max_len} tokens (--max_context)", "context_length_exceeded",
                       param="messages")
    return asked if asked is not None else min(service.gen.max_new_tokens, limit, room)


# --------------------------------------------------------------------------- NER


def locate_entities(text: str, pairs: Sequence[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """Mentions (character offsets) of answered (entity, type) pairs; see the module docstring."""
    taken = [False] * len(text)
    spans, unplaced = [], []
    for entity, etype in sorted(pairs, key=lambda p: -len(p[0])):  # stable: answer order among equals
        found, start = False, 0
        while entity and (k := text.find(entity, start)) >= 0:
            end = k + len(entity)
            if any(taken[k:end]):
                start = k + 1
                continue
            taken[k:end] = [True] * len(entity)
            spans.append({"text": entity, "type": etype, "start": k, "end": end})
            found, start = True, end
        if not found:
            unplaced.append({"text": entity, "type": etype})
    spans.sort(key=lambda s: s["start"])
    return spans, unplaced


def ner_prompt(service: "Service", text: str) -> list[int]:
    from .inference import Item, prompt_ids
    from .msra import QUERY_PREFIX, SEED_INSTRUCTION

    args = service.args
    instruct = args.instruct or SEED_INSTRUCTION
    prefix = args.query_prefix if args.instruct else (args.query_prefix or QUERY_PREFIX)
    return prompt_ids(service.tokenizer, service.loaded.template, Item(instruct, prefix + text, None), True)


# --------------------------------------------------------------------------- the app


def create_app(service: "Service"):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            # uvicorn has waited for open requests (up to --drain_timeout) before it gets here
            await asyncio.to_thread(service.close, 1.0)

    app = FastAPI(title="cnqlora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        messages = {404: "no such endpoint; see GET /v1/models, POST /v1/chat/completions, /v1/completions, "
                         "/v1/ner, GET /health", 405: "method not allowed on this endpoint"}
        return error_response(ApiError(e.status_code, messages.get(e.status_code, str(e.detail)),
                                       {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)))

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return error_response(ApiError(500, "internal server error; see the server's log", "internal_error"))

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", "invalid_api_key")

    async def read_json(request: Request) -> Any:
        limit = service.serve_args.max_body_bytes
        length = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body is larger than {limit} bytes (--max_body_bytes)",
                           "request_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None

    async def watch_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def finished(request: Request, job: "Job") -> None:
        """Wait for the answer; a client that leaves first cancels it (its slot is freed)."""
        watcher = asyncio.ensure_future(watch_disconnect(request))
        try:
            while not job.done:
                waiter = asyncio.ensure_future(job.changed.wait())
                await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                job.changed.clear()
                if watcher.done() and not job.done:
                    waiter.cancel()
                    job.cancel(abandoned=True)
                    raise asyncio.CancelledError
        finally:
            watcher.cancel()
        if job.error:
            raise ApiError(500, job.error, "engine_failed")

    def sse(data: Any) -> bytes:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    async def stream(job: "Job", chunk, include_usage: bool):
        """Server-sent events: text deltas as they are safe to send, then the finish reason, usage, [DONE]."""
        sent = 0
        try:
            yield sse(chunk(None, None, first=True))
            while True:
                await job.changed.wait()
                job.changed.clear()
                if job.error:
                    yield sse(ApiError(500, job.error, "engine_failed").body())
                    break
                text = job.safe_text()
                if len(text) > sent:
                    yield sse(chunk(text[sent:], None))
                    sent = len(text)
                if job.done:
                    yield sse(chunk(None, job.finish_reason))
                    if include_usage:
                        yield sse(chunk(None, None, usage=job.usage()))
                    yield b"data: [DONE]\n\n"
                    break
        finally:
            if not job.done:
                job.cancel(abandoned=True)  # the client left mid-stream: free its slot

    def prepared(body, prompt: list[int], asked: int | None):
        stops = _stops(body)
        sampling = _sampling(service, body)
        max_tokens = _max_tokens(service, asked, len(prompt))
        return stops, sampling, max_tokens

    async def grounded(text: str, types: list[str], max_tokens: int):
        from .grounded import GroundedAnswer

        try:
            # building a text's grammar is CPU work: off the event loop
            return await asyncio.to_thread(GroundedAnswer, service.tokenizer, text, types, max_tokens,
                                           shared=service._shared)
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value", param="max_tokens") from None

    def types_of(asked: list[str] | None) -> list[str]:
        from .grounded import _check_types

        types = list(asked) if asked else service.types
        if not types:
            raise ApiError(400, "send the entity types (\"types\": [\"人名\", \"地名\"]): this server was started "
                           "without --types and has none from the adapter's training data", "missing_types",
                           param="types")
        try:
            return _check_types(types)
        except ValueError as e:
            raise ApiError(422, str(e), "invalid_value", param="types") from None

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        info = service.health()
        return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.started,
                                            "owned_by": "cnqlora"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from .inference import prompt_ids

        authorize(request)
        body = parse_body("chat", await read_json(request))
        check_model(service, body.model)
        item = chat_item(service, body.messages)
        prompt = prompt_ids(service.tokenizer, service.loaded.template, item, service.args.with_prompt)
        stops, sampling, max_tokens = prepared(body, prompt, body.max_completion_tokens or body.max_tokens)
        constraint = None
        if service.args.grounded:
            from .grounded import ner_text_from_query

            constraint = await grounded(ner_text_from_query(item.query or item.instruct), types_of(None), max_tokens)
        job = service.submit(prompt, max_tokens, stops, sampling, body.seed, constraint, body.stream)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish, first=False, usage=None):
            choices = [] if usage else [{"index": 0, "delta": ({"role": "assistant", "content": ""} if first else
                                                               {"content": text} if text else {}),
                                         "logprobs": None, "finish_reason": finish}]
            out = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
                   "choices": choices}
            if usage:
                out["usage"] = usage
            return out

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(job, chunk, include), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await finished(request, job)
        return {"id": ident, "object": "chat.completion", "created": created, "model": service.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None,
                             "finish_reason": job.finish_reason}], "usage": job.usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        from .data import encode_text

        authorize(request)
        body = parse_body("completion", await read_json(request))
        check_model(service, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request (requests run concurrently anyway)", "invalid_value",
                           param="prompt")
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", "unsupported_parameter",
                           param="echo" if body.echo else "suffix")
        if not prompts[0]:
            raise ApiError(400, "the prompt is empty", "invalid_value", param="prompt")
        prompt = encode_text(service.tokenizer, prompts[0])
        stops, sampling, max_tokens = prepared(body, prompt, body.max_tokens)
        job = service.submit(prompt, max_tokens, stops, sampling, body.seed, stream=body.stream)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish, first=False, usage=None):
            out = {"id": ident, "object": "text_completion", "created": created, "model": service.model_name,
                   "choices": [] if usage else [{"index": 0, "text": text or "", "logprobs": None,
                                                 "finish_reason": finish}]}
            if usage:
                out["usage"] = usage
            return out

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))

            async def without_first():
                # completions chunks have no role delta: skip the opening empty chunk
                events = stream(job, chunk, include)
                await events.__anext__()
                async for event in events:
                    yield event

            return StreamingResponse(without_first(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await finished(request, job)
        return {"id": ident, "object": "text_completion", "created": created, "model": service.model_name,
                "choices": [{"index": 0, "text": job.text, "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": job.usage()}

    @app.post("/v1/ner")
    async def ner(request: Request):
        from .metrics import parse_answer

        authorize(request)
        body = parse_body("ner", await read_json(request))
        check_model(service, body.model)
        types = types_of(body.types)
        prompt = ner_prompt(service, body.text)
        max_tokens = _max_tokens(service, body.max_tokens, len(prompt))
        constraint = await grounded(body.text, types, max_tokens)
        from .engine import Sampling

        job = service.submit(prompt, max_tokens, (), Sampling(False), None, constraint)
        await finished(request, job)
        parsed = parse_answer(job.text, types)
        spans, unplaced = locate_entities(body.text, parsed.entities)
        return {"id": f"ner-{uuid.uuid4().hex}", "object": "ner", "model": service.model_name, "text": body.text,
                "types": types, "answer": job.text, "entities": spans, "unplaced": unplaced,
                "well_formed": parsed.well_formed, "finish_reason": job.finish_reason, "usage": job.usage()}

    return app


# --------------------------------------------------------------------------- the command


def check_before_loading(args, gen, serve_args: ServeArgs) -> None:
    """What can be wrong without the model: option combinations, the API key file."""
    if args.interactive or args.data_file:
        raise UserError("--serve answers HTTP requests; leave out --interactive and --data_file.")
    if gen.engine == "hf" or gen.repetition_penalty != 1.0:
        raise UserError("--serve decodes with the generation engine: leave out --engine hf and "
                        "--repetition_penalty.")
    read_api_key(serve_args.api_key)
    if not os.path.isfile(os.path.join(STATIC, "index.html")):
        raise UserError(f"{STATIC}/index.html is missing: the installation is incomplete.")


@functools.lru_cache(maxsize=None)
def _server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, which also tells the service at the first Ctrl-C/SIGTERM: new requests then get 503."""

        def __init__(self, config, service: "Service") -> None:
            super().__init__(config)
            self.service = service

        def handle_exit(self, sig, frame) -> None:
            self.service.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has stopped, which would end the process
            # by that signal after the drain; a drained server exits normally (status 0) instead.
            getattr(self, "_captured_signals", []).clear()

    return _Server


def Server(service: "Service", drain_timeout: float = 30.0):  # noqa: N802 - uvicorn is imported on first use
    """The uvicorn server for `service` (run it with .run(sockets=[bind(host, port)]))."""
    import uvicorn

    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(drain_timeout, 0.01))
    return _server_class()(config, service)


class ServerThread:
    """The server in a thread of this process, on `host` and a free port (tests, benchmarks)."""

    def __init__(self, service: "Service", host: str = "127.0.0.1", drain_timeout: float = 5.0) -> None:
        self.service = service
        self.sock = bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.server = Server(service, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def serve(model_args, prompt_args, args, gen, serve_args: ServeArgs, log=print) -> int:
    """predict.py --serve: check options, bind the port, load the model, serve until Ctrl-C/SIGTERM."""
    from .inference import _types_from_training_data, load_for_inference

    check_before_loading(args, gen, serve_args)
    types = list(args.types) or (_types_from_training_data(args.lora_model) if args.lora_model else [])
    if args.grounded and not types:
        raise UserError("--grounded needs the entity types: pass --types 人名,地名,机构名 (the adapter's training "
                        "data is not there to infer them from).")
    sock = bind(serve_args.host, serve_args.port)
    try:
        loaded = load_for_inference(model_args, prompt_args, args.lora_model, args.adapter_mode,
                                    args.fused_kernels, args.grounded)
        service = Service(loaded, args, gen, serve_args, types, model_name=serve_args.served_model_name)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log(f"loaded in {loaded.seconds:.1f}s: {loaded.description}")
        if service.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            log(f"note: {host} can be reached from other machines and no --api_key is set: anyone there can use "
                "the model")
        log(f"serving {service.model_name!r} at http://{shown}:{port}/ (API: http://{shown}:{port}/v1"
            f"{', key required' if service.api_key else ''}); Ctrl-C or SIGTERM drains and stops", flush=True)
        Server(service, serve_args.drain_timeout).run(sockets=[sock])
    finally:
        sock.close()
    log(f"stopped ({service.counts['completed']} answered, {service.counts['cancelled']} cancelled)")
    return 0
