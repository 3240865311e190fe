"""Stand-in for vllm/vllm-openai: takes `vllm serve` flags, serves vLLM's HTTP API, fake text."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Json = dict[str, Any]
TOKEN_DELAY_S = float(os.environ.get("VLLM_STANDIN_TOKEN_DELAY_S", "0.01"))
DEFAULT_MAX_TOKENS = 16
DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
LOG_LEVELS = ["debug", "info", "warning", "error", "critical", "trace"]
INT_FLAGS = (
    "max-model-len",
    "max-num-batched-tokens",
    "seed",
    "num-gpu-blocks-override",
    "max-logprobs",
)
SIZE_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}  # upper case: powers of 1024
TEXT_FLAGS = (
    "chat-template",
    "revision",
    "code-revision",
    "tokenizer",
    "tokenizer-mode",
    "tokenizer-revision",
    "config-format",
    "load-format",
    "download-dir",
    "api-key",
    "tool-call-parser",
    "reasoning-parser",
    "kv-cache-dtype",
    "attention-backend",
    "limit-mm-per-prompt",
    "mm-processor-kwargs",
    "generation-config",
    "override-generation-config",
    "structured-outputs-config",
    "speculative-config",
    "hf-overrides",
    "scheduling-policy",
)
BOOL_FLAGS = (
    "enforce-eager",
    "trust-remote-code",
    "enable-prefix-caching",
    "enable-auto-tool-choice",
    "enable-log-requests",
    "disable-sliding-window",
    "skip-tokenizer-init",
    "enable-chunked-prefill",
)
# what vLLM's runner "auto" reads as a generative model; any other architecture is a pooling one
GENERATIVE = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
METRICS = {  # name: (type, help), as vLLM exports them
    "num_requests_running": ("gauge", "Number of requests in model execution batches."),
    "num_requests_waiting": ("gauge", "Number of requests waiting to be processed."),
    "gpu_cache_usage_perc": ("gauge", "GPU KV-cache usage. 1 means 100 percent usage."),
    "kv_cache_usage_perc": ("gauge", "KV-cache usage. 1 means 100 percent usage."),
    "prompt_tokens": ("counter", "Number of prefill tokens processed."),
    "generation_tokens": ("counter", "Number of generation tokens processed."),
}


def size(text: str) -> int:
    """vLLM's human_readable_int: digits, or a number and a unit (4G is 4 GiB, 1.5g 1.5e9)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", text)
    if found is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    number, unit = found.groups()
    if not unit:
        return int(number)
    if unit.isupper():
        return int(number) * 1024 ** (list(SIZE_UNITS).index(unit.lower()) + 1)
    return int(float(number) * SIZE_UNITS[unit])


def make_parser() -> argparse.ArgumentParser:
    """The flags of `vllm serve` (vLLM 0.32) the appliance may pass; each one must be one of the
    real vLLM's (tests/images/test_vllm_contract.py checks it against vLLM's own parser)."""
    p = argparse.ArgumentParser(prog="vllm serve", usage="vllm serve [model_tag] [options]")
    p.add_argument("model_tag", nargs="?", help="model name or path (wins over --model)")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-offload-gb", type=float)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--quantization", "-q")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, choices=[1, 8, 16, 32, 64, 128])
    p.add_argument("--uvicorn-log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--kv-cache-memory-bytes", type=size)
    p.add_argument("--runner", default="auto", choices=["auto", "generate", "pooling", "draft"])
    p.add_argument("--convert", default="auto", choices=["auto", "none", "embed", "classify"])
    for name in INT_FLAGS:
        p.add_argument(f"--{name}", type=int)
    for name in TEXT_FLAGS:
        p.add_argument(f"--{name}")
    for name in BOOL_FLAGS:  # vLLM's boolean flags also take --no-<flag>
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--disable-log-stats", action="store_true")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return make_parser().parse_args(argv)


class Engine:
    """Counts requests like vLLM's scheduler: up to max_num_seqs run, the rest wait."""

    def __init__(self, max_num_seqs: int) -> None:
        self.cond = threading.Condition()
        self.max_num_seqs = max_num_seqs
        self.running = self.waiting = self.prompt_tokens = self.generation_tokens = 0

    @contextmanager
    def slot(self, prompt_tokens: int) -> Iterator[None]:
        with self.cond:
            self.waiting += 1
            self.cond.wait_for(lambda: self.running < self.max_num_seqs)
            self.waiting -= 1
            self.running += 1
            self.prompt_tokens += prompt_tokens
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify()

    def tokens(self, prompt: str, n: int) -> Iterator[str]:
        """Deterministic words taken from the prompt; one word is one token."""
        words = re.findall(r"[a-z0-9']+", prompt.lower()) or ["hello"]
        start = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        for i in range(n):
            time.sleep(TOKEN_DELAY_S)
            with self.cond:
                self.generation_tokens += 1
            yield words[(start + i) % len(words)]

    def metrics(self, model: str) -> str:
        with self.cond:
            use = self.running / self.max_num_seqs
            values = [
                self.running,
                self.waiting,
                use,
                use,
                self.prompt_tokens,
                self.generation_tokens,
            ]
        out = []
        for (name, (kind, doc)), value in zip(METRICS.items(), values, strict=True):
            sample = f"vllm:{name}_total" if kind == "counter" else f"vllm:{name}"
            out += [f"# HELP vllm:{name} {doc}", f"# TYPE vllm:{name} {kind}"]
            out.append(f'{sample}{{model_name="{model}"}} {float(value)}')
        return "\n".join(out) + "\n"


def count_words(text: str) -> int:
    return max(1, len(text.split()))


def message_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text", "") if isinstance(part, dict) else ""
                if not isinstance(text, str):  # vLLM's request model refuses it
                    raise ApiError(400, "BadRequestError", "a text part's `text` must be a string.")
                parts.append(text)
    return "\n".join(parts)


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    total = prompt_tokens + completion_tokens
    return dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )


def response_usage(input_tokens: int, output_tokens: int) -> Json:
    """The Responses API's usage, as vLLM writes it (its details before each count's next)."""
    return dict(
        input_tokens=input_tokens,
        input_tokens_details={"cached_tokens": 0},
        output_tokens=output_tokens,
        output_tokens_details={"reasoning_tokens": 0},
        total_tokens=input_tokens + output_tokens,
    )


def check_context(limit: int | None) -> None:
    """vLLM refuses a request asking for more tokens than the model's context holds."""
    if limit is not None and limit > Handler.max_model_len:
        raise ApiError(
            400,
            "BadRequestError",
            f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's "
            f"maximum context length is {Handler.max_model_len} tokens.",
        )


class ApiError(Exception):
    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.kind, self.message = code, kind, message


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version, sys_version = "uvicorn", ""
    engine: Engine
    names: list[str]
    pooling = False  # serves /v1/embeddings only (`pooling`), else chat and completions only
    api_key: str | None = None
    quiet = False
    max_model_len = 1_048_576  # the model's context (`--max-model-len`, else this)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            print(f"INFO:     {self.address_string()} - {format % args}", flush=True)

    def send_body(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code: int, obj: Any) -> None:
        self.send_body(code, json.dumps(obj).encode())

    def authorized(self) -> bool:
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.send_json(401, {"error": "Unauthorized"})
            return False
        return True

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/health":
            self.send_body(200, b"")
        elif path == "/metrics":
            text = self.engine.metrics(self.names[0]).encode()
            self.send_body(200, text, "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/version":
            self.send_json(200, {"version": "0.0.0+standin"})
        elif path == "/v1/models":
            if self.authorized():
                now = int(time.time())
                card = dict(object="model", created=now, owned_by="vllm", parent=None)
                data = [card | {"id": n, "root": n} for n in self.names]
                self.send_json(200, {"object": "list", "data": data})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        # vLLM registers the routes of its runner only: /v1/embeddings for a pooling model,
        # chat, completions and responses for a generative one; any other path is Starlette's
        # bare 404
        if self.pooling:
            routes = {"/v1/embeddings": self.embeddings}
        else:
            routes = {
                "/v1/chat/completions": self.completion,
                "/v1/completions": self.completion,
                "/v1/responses": self.response,
            }
        path = self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path not in routes:
            self.send_json(404, {"detail": "Not Found"})
            return
        if not self.authorized():
            return
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ApiError(400, "BadRequestError", "Request body must be a JSON object.")
            model = req.get("model") or self.names[0]
            if model not in self.names:
                raise ApiError(404, "NotFoundError", f"The model `{model}` does not exist.")
            routes[path](path, req, model)
        except json.JSONDecodeError as e:
            self.send_error_json(ApiError(400, "BadRequestError", f"Invalid JSON: {e}"))
        except ApiError as e:
            self.send_error_json(e)

    def client_gone(self) -> bool:
        """Whether the client hung up: its socket reads as closed (bytes of a next request
        waiting on it do not count)."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send_error_json(self, e: ApiError) -> None:
        err = {"message": e.message, "type": e.kind, "param": None, "code": e.code}
        self.send_json(e.code, {"error": err})

    def completion(self, path: str, req: Json, model: str) -> None:
        chat = path == "/v1/chat/completions"
        if chat:
            if not isinstance(req.get("messages"), list) or not req["messages"]:
                raise ApiError(400, "BadRequestError", "`messages` must be a non-empty list.")
            prompt = message_text(req["messages"])
        else:
            raw = req.get("prompt")
            if raw is None:
                raise ApiError(400, "BadRequestError", "`prompt` is required.")
            if not isinstance(raw, str | list) or not raw:  # as vLLM's request model refuses
                raise ApiError(400, "BadRequestError", "`prompt` must be a text or a list.")
            prompt = raw if isinstance(raw, str) else " ".join(map(str, raw))
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ApiError(400, "BadRequestError", "`max_tokens` must be a positive integer.")
        check_context(limit)
        n = limit or DEFAULT_MAX_TOKENS
        finish = "length" if limit else "stop"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        p_tokens = count_words(prompt)
        if req.get("stream"):
            opts = req.get("stream_options") or {}
            self.stream(
                self.events(chat, rid, model, prompt, n, finish, bool(opts.get("include_usage")))
            )
            return
        words: list[str] = []
        with self.engine.slot(p_tokens):
            for word in self.engine.tokens(prompt, n):
                if self.client_gone():  # vLLM aborts a request whose client disconnected
                    self.close_connection = True
                    return
                words.append(word)
        text = " ".join(words)
        choice: Json = {"index": 0, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        else:
            choice["text"] = text
        kind = "chat.completion" if chat else "text_completion"
        body = dict(id=rid, object=kind, created=int(time.time()), model=model, choices=[choice])
        self.send_json(200, body | {"usage": usage(p_tokens, n)})

    def events(
        self, chat: bool, rid: str, model: str, prompt: str, n: int, finish: str, with_usage: bool
    ) -> Generator[Json, None, None]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        base: Json = dict(id=rid, object=kind, created=int(time.time()), model=model)

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> Json:
            choice: Json = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                delta = {"role": "assistant"} if role else {}
                choice["delta"] = delta | ({} if text is None else {"content": text})
            else:
                choice["text"] = text or ""
            return base | {"choices": [choice]} | ({"usage": None} if with_usage else {})

        p_tokens = count_words(prompt)
        with self.engine.slot(p_tokens):
            if chat:
                yield chunk("", role=True)
            for i, word in enumerate(self.engine.tokens(prompt, n)):
                yield chunk(word if i == 0 else f" {word}")
            yield chunk(None if chat else "", finish)
        if with_usage:
            yield base | {"choices": [], "usage": usage(p_tokens, n)}

    def response(self, path: str, req: Json, model: str) -> None:
        """vLLM's Responses API (its store off, as by default): one response, kept nowhere.
        Events are named (`event: response.output_text.delta`) and numbered, the last one
        `response.completed` with the whole response and its usage; no `[DONE]`."""
        raw = req.get("input")
        if isinstance(raw, str):
            prompt = raw
        elif isinstance(raw, list) and raw:
            prompt = message_text(raw)
        else:
            raise ApiError(400, "BadRequestError", "`input` must be a string or a list.")
        if isinstance(req.get("instructions"), str):
            prompt = f"{req['instructions']}\n{prompt}"
        limit = req.get("max_output_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ApiError(400, "BadRequestError", "`max_output_tokens` must be positive.")
        check_context(limit)
        if req.get("previous_response_id") is not None:
            rid = req["previous_response_id"]
            raise ApiError(404, "NotFoundError", f"Response with id '{rid}' not found.")
        n = limit or DEFAULT_MAX_TOKENS
        p_tokens = count_words(prompt)
        rid, mid, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())

        def whole(text: str | None) -> Json:
            output: list[Json] = []
            if text is not None:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
                item = {"id": mid, "type": "message", "role": "assistant", "status": "completed"}
                output.append(item | {"content": [part]})
            done = text is not None
            return dict(
                id=rid, created_at=created, incomplete_details=None,
                instructions=req.get("instructions"), metadata=None, model=model,
                object="response", output=output, parallel_tool_calls=True, temperature=1.0,
                tool_choice="auto", tools=req.get("tools") or [], top_p=1.0, background=False,
                max_output_tokens=n, previous_response_id=None, reasoning=None,
                service_tier="auto",
                status=("incomplete" if limit else "completed") if done else "in_progress",
                text={"format": {"type": "text"}}, top_logprobs=0, truncation="disabled",
                usage=response_usage(p_tokens, n) if done else None, user=None,
            )  # fmt: skip

        if req.get("stream"):
            self.stream(self.response_events(whole, mid, prompt, n), named=True)
            return
        words: list[str] = []
        with self.engine.slot(p_tokens):
            for word in self.engine.tokens(prompt, n):
                if self.client_gone():
                    self.close_connection = True
                    return
                words.append(word)
        self.send_json(200, whole(" ".join(words)))

    def response_events(
        self, whole: Any, mid: str, prompt: str, n: int
    ) -> Generator[Json, None, None]:
        at = {"output_index": 0, "item_id": mid}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {"id": mid, "type": "message", "role": "assistant", "content": []}
        yield {"type": "response.created", "response": whole(None)}
        yield {"type": "response.in_progress", "response": whole(None)}
        p_tokens = count_words(prompt)
        words: list[str] = []
        with self.engine.slot(p_tokens):
            for i, word in enumerate(self.engine.tokens(prompt, n)):
                if i == 0:
                    added = {"type": "response.output_item.added", "output_index": 0}
                    yield added | {"item": item | {"status": "in_progress"}}
                    yield {"type": "response.content_part.added", **at, "content_index": 0,
                           "part": part}  # fmt: skip
                delta = word if i == 0 else f" {word}"
                words.append(delta)
                yield {"type": "response.output_text.delta", **at, "content_index": 0,
                       "delta": delta, "logprobs": []}  # fmt: skip
        text = "".join(words)
        yield {"type": "response.output_text.done", **at, "content_index": 0, "text": text,
               "logprobs": []}  # fmt: skip
        yield {"type": "response.content_part.done", **at, "content_index": 0,
               "part": part | {"text": text}}  # fmt: skip
        done_item = item | {"status": "completed", "content": [part | {"text": text}]}
        yield {"type": "response.output_item.done", "output_index": 0, "item": done_item}
        yield {"type": "response.completed", "response": whole(text)}

    def stream(self, events: Generator[Json, None, None], *, named: bool = False) -> None:
        """Server-sent events: OpenAI's chat and completions as `data:` lines ending in
        `[DONE]`; with `named`, the Responses API's, each with its `event:` type and a
        sequence number, and no `[DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for number, event in enumerate(events):
                if named:
                    event = event | {"sequence_number": number}
                    line = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                else:
                    line = f"data: {json.dumps(event)}\n\n"
                self.write_chunk(line.encode())
            if not named:
                self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # client went away: stop generating
        finally:
            events.close()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def embeddings(self, path: str, req: Json, model: str) -> None:
        raw = req.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise ApiError(400, "BadRequestError", "`input` must be a string or a list.")
        data, p_tokens = [], 0
        for i, text in enumerate(map(str, texts)):
            digest = hashlib.sha256(text.encode()).digest()[:16]
            vec = [b / 255 - 0.5 for b in digest]
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [v / norm for v in vec]})
            p_tokens += count_words(text)
        with self.engine.slot(p_tokens):
            pass
        body = dict(id=f"embd-{uuid.uuid4().hex}", object="list", model=model, data=data)
        self.send_json(200, body | {"usage": usage(p_tokens, 0)})


def pooling(model: str) -> bool:
    """Whether vLLM would run `model` as a pooling (embedding) model: a local model whose
    config.json names architectures, none of them generative. A hub id (nothing to read here)
    counts as generative, as most are."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    names = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(names, list) or not names:
        return False
    return not any(str(name).endswith(GENERATIVE) for name in names)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    model = args.model_tag or args.model
    if model.startswith("/") and not os.path.exists(model):
        print(
            f"ERROR {time.strftime('%m-%d %H:%M:%S')} [standin] Engine failed to start.\n"
            f"ValueError: Invalid repository ID or local directory specified: '{model}'.",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 in a container
    Handler.engine = Engine(args.max_num_seqs)
    Handler.names = args.served_model_name or [model]
    Handler.pooling = args.runner == "pooling" or (
        args.runner == "auto" and (args.convert in ("embed", "classify") or pooling(model))
    )
    Handler.max_model_len = args.max_model_len or Handler.max_model_len
    Handler.api_key = args.api_key or os.environ.get("VLLM_API_KEY")
    Handler.quiet = args.uvicorn_log_level not in ("debug", "info", "trace")
    print(f"INFO vLLM stand-in: model={model} served={Handler.names} args={vars(args)}", flush=True)
    time.sleep(float(os.environ.get("VLLM_STANDIN_STARTUP_DELAY_S", "2")))  # "loading weights"
    server = ThreadingHTTPServer((args.host or "0.0.0.0", args.port), Handler)
    print(f"INFO:     Uvicorn running on http://{args.host or '0.0.0.0'}:{args.port}", flush=True)
    print("INFO:     Application startup complete.", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
