"""A teacher over HTTP: plain http:// to another machine is refused unless --allow-insecure-teacher, credentials in
the URL reach the teacher but never a file, the output or an error, and a malformed or oversized answer is a clear
error (exit 2), not a traceback. The teacher is a small fake endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cli_runner import run_edgepack
from serving_helpers import free_port

from edgepack.core.net import display_url
from edgepack.distill.teacher_endpoint import MAX_RESPONSE_BYTES

SECRETS = ("hunter2-userinfo", "sk-query-secret", "sk-env-secret")
GOOD_ANSWER = {"choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "The ships sail."},
                            "logprobs": {"content": [
                                {"token": "The", "logprob": -0.1, "top_logprobs": [{"token": "The", "logprob": -0.1},
                                                                                   {"token": "A", "logprob": -2.5}]},
                                {"token": " ships", "logprob": -0.4, "top_logprobs": []},
                                {"token": " sail.", "logprob": -0.7}]}}]}


class FakeTeacher(ThreadingHTTPServer):
    """GET .../models and POST .../chat/completions, answering with whatever the test sets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models_body: Callable[[], Iterable[bytes]] = lambda: [json.dumps({"data": [{"id": "teacher"}]}).encode()]
        self.chat_body: Callable[[], Iterable[bytes]] = lambda: [json.dumps(GOOD_ANSWER).encode()]
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header)

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: no Content-Length needed
    server: FakeTeacher

    def do_GET(self) -> None:
        self._answer(self.server.models_body())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(self.server.chat_body())

    def _answer(self, chunks: Iterable[bytes]) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what the size bound is for

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def teacher_server() -> Iterator[FakeTeacher]:
    server = FakeTeacher()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Say something about ships."}) + "\n", encoding="utf-8")
    return path


def distill(url: str, student: Path, prompts: Path, out: Path, tmp_path: Path, *extra: str):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache"), "EDGEPACK_TEACHER_API_KEY": "sk-env-secret"}
    return run_edgepack(["distill", "--teacher-url", url, "--teacher-model", "teacher", "--mode", "sequence",
                         "--student", str(student), "--prompts", str(prompts), "--max-answer-tokens", "12",
                         "--max-steps", "1", "--batch-size", "1", "--eval-windows", "1", "--out", str(out), "--json",
                         *extra], env)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into: {text[-2000:]}"


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pw@api.example.com/v1?api_key=k#frag", "https://api.example.com/v1"),
    ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
    ("https://tok@host:8443", "https://host:8443"),
])
def test_display_url_drops_userinfo_query_and_fragment(url, shown):
    assert display_url(url) == shown


def test_plain_http_to_another_machine_is_refused_unless_allowed(tiny_model, prompts, tmp_path):
    # 0.0.0.0 is not a loopback address; with the flag, the connection is refused at once (nothing listens there)
    address = f"0.0.0.0:{free_port()}"
    url = f"http://user:hunter2-userinfo@{address}/v1?api_key=sk-query-secret"
    refused = distill(url, tiny_model("llama-bpe"), prompts, tmp_path / "a", tmp_path)
    message = one_line(refused.stderr)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"--teacher-url http://{address}/v1: plain http://" in message
    assert "--allow-insecure-teacher" in message and "localhost, 127.0.0.0/8 and ::1" in message
    assert_no_secret(refused.stdout, refused.stderr)
    assert not (tmp_path / "a").exists()

    allowed = distill(url, tiny_model("llama-bpe"), prompts, tmp_path / "b", tmp_path, "--allow-insecure-teacher")
    assert allowed.returncode == 2 and "cannot be reached" in allowed.stderr, allowed.stderr[-2000:]
    assert f"http://{address}/v1" in one_line(allowed.stderr) and "Traceback" not in allowed.stderr
    assert_no_secret(allowed.stdout, allowed.stderr)


def test_credentials_in_the_teacher_url_reach_the_teacher_but_no_file_or_output(teacher_server, tiny_model, prompts,
                                                                                   tmp_path):
    url = f"http://user:hunter2-userinfo@{teacher_server.base}/v1?api_key=sk-query-secret"
    done = distill(url, tiny_model("llama-bpe"), prompts, tmp_path / "out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["teacher"]["name"] == f"teacher at http://{teacher_server.base}/v1"
    basic = "Basic " + base64.b64encode(b"user:hunter2-userinfo").decode()  # the URL's user:password@
    assert ("/v1/chat/completions?api_key=sk-query-secret", basic) in teacher_server.seen
    written = [p for root in (tmp_path / "out", tmp_path / "cache") for p in root.rglob("*") if p.is_file()]
    assert {"distill.json", "report.md"} <= {p.name for p in written}
    assert_no_secret(done.stdout, done.stderr, *(p.read_bytes().decode("latin-1") for p in written))


def _huge() -> Iterator[bytes]:
    yield b'{"choices": [{"message": {"content": "'
    for _ in range(MAX_RESPONSE_BYTES // 2**20 + 1):
        yield b"x" * 2**20


@pytest.mark.parametrize(("route", "body", "message"), [
    ("chat", '{"choices": []}', "gave a malformed answer to POST /chat/completions: choices is an empty list"),
    ("chat", '{"choices": [{"message": {"content": 7}}]}', "choices[0].message.content is a number, not a string"),
    ("chat", '{"id": "x"}', "the answer has no 'choices'"),
    ("chat", '{"choices": [{"message": {"content": "hi"}, "logprobs": {"content": [{"token": "hi"}]}}]}',
     "choices[0].logprobs.content[0] has no 'logprob'"),
    ("chat", "<html>bad gateway</html>", "the body is not JSON ('<html>bad gateway</html>')"),
    ("chat", _huge, f"sent more than {MAX_RESPONSE_BYTES // 2**20} MiB in answer to POST /chat/completions"),
    ("models", '{"data": "none"}', "malformed answer to GET /models: data is a string, not a list"),
])
def test_a_malformed_teacher_answer_is_a_clear_error(teacher_server, tiny_model, prompts, tmp_path, route, body,
                                                     message):
    make = body if callable(body) else (lambda: [body.encode()])
    setattr(teacher_server, f"{route}_body", make)
    url = f"http://user:hunter2-userinfo@{teacher_server.base}/v1?api_key=sk-query-secret"
    done = distill(url, tiny_model("llama-bpe"), prompts, tmp_path / "out", tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in one_line(done.stderr) and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"the teacher endpoint http://{teacher_server.base}/v1" in one_line(done.stderr)
    assert_no_secret(done.stdout, done.stderr)
    assert not (tmp_path / "out" / "config.json").exists()
