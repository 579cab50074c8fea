"""The OpenAI-compatible server as clients see it: the real server on loopback, the official `openai` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from openai import APITimeoutError, AuthenticationError, BadRequestError, OpenAI, RateLimitError

from edge_ms.model import DeviceSettings
from edge_ms.modes import MODES
from edge_ms.reasoner import Reasoner
from edge_ms.server import create_app

try:
    import httpx2 as httpx  # what openai >= 3 is built on
except ImportError:  # older openai releases use httpx
    import httpx

QUESTION = [{"role": "user", "content": "What is 6 times 7?"}]
# One thread: on a busy 2-core machine llama.cpp's two-thread barrier runs this tiny model up to 100x slower.
ONE_THREAD = DeviceSettings(n_threads=1)
ERROR_KEYS = {"message", "type", "param", "code"}


class Server:
    """``create_app`` served by a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, model_dir, **kwargs) -> None:
        self.reasoner = Reasoner.load(model_dir, settings=ONE_THREAD)
        app = create_app(self.reasoner, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused", **kwargs) -> OpenAI:
        kwargs.setdefault("timeout", 120)
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.reasoner.close()


@pytest.fixture
def start_server(converted):
    servers: list[Server] = []

    def start(**kwargs) -> Server:
        servers.append(Server(converted("tiny-qwen2", "f32"), **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(converted):
    s = Server(converted("tiny-qwen2", "f32"))
    yield s
    s.stop()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def test_plain_request_relays_the_reasoner(server, converted):
    client = server.client()
    [model] = client.models.list().data
    assert model.id == "tiny-qwen2-f32"
    out = client.chat.completions.create(
        model=model.id, messages=QUESTION, reasoning_effort="low", max_tokens=24, seed=3
    )
    assert out.model == model.id and out.object == "chat.completion"
    ext = out.edge_ms
    assert ext["n"] == 2 and ext["reasoning_effort"] == "low" and ext["seed"] == 3
    scores = [c["score"] for c in ext["candidates"]]
    assert ext["selected"] == scores.index(max(scores))
    for c in ext["candidates"]:
        assert 0 < c["completion_tokens"] <= 24 and c["finish_reason"] in ("stop", "length")
        assert all(0.0 <= s <= 1.0 for s in c["step_scores"])
    # usage counts every trajectory, not only the selected one
    assert out.usage.completion_tokens == sum(c["completion_tokens"] for c in ext["candidates"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # The same request straight through the library gives the same selection, answer and thinking.
    local = Reasoner.load(converted("tiny-qwen2", "f32"), settings=ONE_THREAD)
    try:
        res = local.solve(QUESTION, "low", seed=3, max_new_tokens=24)
    finally:
        local.close()
    assert out.usage.prompt_tokens == len(res.prompt_token_ids)
    assert ext["selected"] == res.selected and scores == [c.score for c in res.candidates]
    assert out.choices[0].message.content == res.answer
    assert (out.choices[0].message.reasoning_content or "") == res.best.reasoning
    assert out.choices[0].finish_reason == ("length" if res.best.finish_reason == "length" else "stop")


@pytest.mark.parametrize("effort", [None, *MODES])
def test_effort_sets_the_number_of_trajectories(server, effort):
    extra = {} if effort is None else {"reasoning_effort": effort}
    out = server.client().chat.completions.create(
        model="m", messages=QUESTION, max_completion_tokens=8, **extra
    )
    assert len(out.edge_ms["candidates"]) == out.edge_ms["n"] == MODES[effort or "medium"]
    assert all(c["completion_tokens"] <= 8 for c in out.edge_ms["candidates"])


def test_stream_carries_progress_then_the_same_answer(server):
    client = server.client()
    # Seed 3 selects a trajectory that closed its think block, so both thinking and answer are streamed.
    args = dict(model="m", messages=QUESTION, reasoning_effort="low", max_tokens=24, seed=3)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    progress = [
        c.edge_ms["progress"] for c in with_choice if getattr(c, "edge_ms", None) and "progress" in c.edge_ms
    ]
    assert progress, "no progress while the trajectories ran"
    assert [p["finished"] for p in progress] == sorted(p["finished"] for p in progress)
    assert progress[-1]["finished"] == 2 and progress[-1]["generated_tokens"] == whole.usage.completion_tokens
    content = "".join(c.choices[0].delta.content or "" for c in with_choice)
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in with_choice)
    assert content == whole.choices[0].message.content
    # A random fixture trajectory may never close its think block; then there is no thinking to split off.
    assert thinking == (whole.choices[0].message.reasoning_content or "")
    assert content or thinking
    final = with_choice[-1]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    assert final.edge_ms["candidates"] == whole.edge_ms["candidates"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_search_strategy_in_the_request_extension(server, converted):
    client = server.client()
    args = dict(model="m", messages=QUESTION, max_tokens=80, seed=11,
                extra_body={"edge_ms": {"strategy": "beam", "beam_width": 2}})
    whole = client.chat.completions.create(**args)
    ext = whole.edge_ms
    cands = ext["candidates"]
    assert ext["strategy"] == "beam" and ext["n"] == 8 and len(cands) > 8  # reasoning_effort keeps meaning N
    forks = [c for c in cands if c["parent"] is not None]
    assert forks and all(c["fork_at"] < c["completion_tokens"] for c in forks)
    assert "pruned" in {c["finish_reason"] for c in cands} and cands[ext["selected"]]["finish_reason"] != "pruned"
    # usage: every token sampled once; a fork's shared prefix belongs to its parent.
    assert whole.usage.completion_tokens == sum(c["completion_tokens"] - (c["fork_at"] or 0) for c in cands)

    chunks = list(client.chat.completions.create(stream=True, **args))
    progress = [c.edge_ms["progress"] for c in chunks if getattr(c, "edge_ms", None) and "progress" in c.edge_ms]
    assert progress[-1]["forks"] == len(forks) and progress[-1]["generated_tokens"] == whole.usage.completion_tokens
    assert chunks[-1].edge_ms["candidates"] == cands

    local = Reasoner.load(converted("tiny-qwen2", "f32"), settings=ONE_THREAD)
    try:
        res = local.solve(QUESTION, "medium", seed=11, max_new_tokens=80, strategy="beam", beam_width=2)
    finally:
        local.close()
    assert [(c.parent, c.fork_at, c.score) for c in res.candidates] == [(c["parent"], c["fork_at"], c["score"])
                                                                         for c in cands]
    assert ext["selected"] == res.selected and whole.choices[0].message.content == res.answer


def burst(server: Server, n: int, **args) -> list:
    """``n`` clients at once, each on its own connection; returns each one's reply or exception."""
    results: list = [None] * n
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        client = server.client()
        gate.wait()
        try:
            results[i] = client.chat.completions.create(model="m", messages=QUESTION, seed=i, **args)
        except Exception as err:  # noqa: BLE001 - the test sorts replies from errors
            results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_burst_within_the_queue_is_all_answered(start_server):
    server = start_server(queue_size=8)
    results = burst(server, 6, reasoning_effort="low", max_tokens=8)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.id for r in results}) == 6
    assert [r.edge_ms["seed"] for r in results] == list(range(6))
    health = server.health()
    assert health["completed"] == 6 and health["rejected"] == 0 and health["queue"]["waiting"] == 0


def test_burst_over_a_queue_of_one_gets_429(start_server):
    server = start_server(queue_size=1)
    # Greedy trajectories of this model run about 750 tokens: each served request takes a while.
    results = burst(server, 5, reasoning_effort="low", max_tokens=1024, temperature=0)
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, RateLimitError)]
    assert len(served) + len(refused) == 5, results
    assert len(served) >= 2 and len(refused) >= 1  # one runs, one waits, the rest are turned away
    for err in refused:
        assert err.status_code == 429
        e = error_of(err.response)
        assert (
            e["type"] == "rate_limit_error" and e["code"] == "rate_limit_exceeded" and "busy" in e["message"]
        )
    health = server.health()
    assert health["rejected"] == len(refused) and health["completed"] == len(served)
    # and it keeps serving
    assert server.client().chat.completions.create(
        model="m", messages=QUESTION, reasoning_effort="low", max_tokens=4
    )


def test_a_client_that_leaves_cancels_its_generation(start_server):
    server = start_server()
    # Greedy, 32 x up to 1024 tokens: about a minute of work on this model; the client gives up after 2 s.
    long = dict(model="m", messages=QUESTION, reasoning_effort="high", max_tokens=1024, temperature=0)
    short = dict(model="m", messages=QUESTION, reasoning_effort="low", max_tokens=8)
    timeouts = []

    def give_up_after(seconds: float, args: dict) -> None:
        try:
            server.client(timeout=seconds).chat.completions.create(**args)
        except APITimeoutError as err:
            timeouts.append(err)

    running = threading.Thread(target=give_up_after, args=(2.0, long))
    running.start()
    time.sleep(0.3)
    # This one waits in the queue behind the long one and leaves before its turn: it is never run.
    give_up_after(1.0, short)
    running.join()
    assert len(timeouts) == 2
    t0 = time.monotonic()
    out = server.client().chat.completions.create(**short)
    assert time.monotonic() - t0 < 10 and out.edge_ms["n"] == 2
    health = server.health()
    assert health["cancelled"] == 2 and health["completed"] == 1
    stopped = health["last_cancelled"]
    assert stopped["token_budget"] == 32 * 1024 and stopped["generated_tokens"] < stopped["token_budget"]
    assert stopped["trajectories_cut"] > 0 and stopped["seconds"] < 10

    # A stream that is closed part way through is cancelled too.
    stream = server.client().chat.completions.create(stream=True, **long)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["cancelled"] < 3:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)
    health = server.health()
    assert health["last_cancelled"]["trajectories_cut"] > 0 and not health["queue"]["running"]
    assert server.client().chat.completions.create(
        model="m", messages=QUESTION, reasoning_effort="low", max_tokens=4
    )


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(url, json=["not", "an", "object"])
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"

    client = server.client()
    n_ctx = server.reasoner.model.n_ctx_train
    cases = [
        (dict(messages=QUESTION, reasoning_effort="extreme"), "reasoning_effort", "extreme"),
        (dict(messages=QUESTION, max_tokens=10**6), "max_tokens", "1000000"),
        (dict(messages=QUESTION, max_completion_tokens=0), "max_completion_tokens", "0"),
        (dict(messages=QUESTION, max_tokens=n_ctx), "max_tokens", "at most"),  # the prompt leaves less room
        (dict(messages=[]), "messages", "empty"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "role"),
        (dict(messages=[{"role": ["user"], "content": "hi"}]), "messages[0].role", "role"),
        (dict(messages=[{"role": "user", "content": 7}]), "messages[0].content", "string"),
        (dict(messages=QUESTION, reasoning_effort=["low"]), "reasoning_effort", "unknown"),
        (dict(messages=QUESTION, stop=[""]), "stop", "non-empty"),
        (dict(messages=QUESTION, temperature=9), "temperature", "temperature"),
        (dict(messages=QUESTION, n=3), "n", "one choice"),
        (dict(messages=QUESTION, extra_body={"edge_ms": "beam"}), "edge_ms", "must be an object"),
        (dict(messages=QUESTION, extra_body={"edge_ms": {"strategy": "dfs"}}), "edge_ms.strategy", "unknown"),
        (dict(messages=QUESTION, extra_body={"edge_ms": {"strategy": "beam", "beam_width": 9}}),
         "edge_ms.beam_width", "from 1 to 8"),
        (dict(messages=QUESTION, reasoning_effort="low", extra_body={"edge_ms": {"strategy": "beam", "beam_width": 3}}),
         "edge_ms.beam_width", "from 1 to 2"),
        (dict(messages=QUESTION, extra_body={"edge_ms": {"beam_width": 2}}), "edge_ms.beam_width", "only with"),
    ]
    for args, param, words in cases:
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model="m", **args)
        e = error_of(info.value.response)
        assert info.value.status_code == 400 and e["param"] == param and words in e["message"], (args, e)
        assert e["type"] == "invalid_request_error"
    out = client.chat.completions.create(model="m", messages=QUESTION, reasoning_effort="low", max_tokens=4)
    assert out.edge_ms["n"] == 2


def test_api_key(start_server):
    server = start_server(api_key="s3cret")
    with pytest.raises(AuthenticationError) as info:
        server.client(api_key="wrong").chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    assert info.value.status_code == 401 and error_of(info.value.response)["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 401 and error_of(r)["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert server.health()["rejected"] == 0  # a liveness probe needs no key

    client = server.client(api_key="s3cret")
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2-f32"]
    out = client.chat.completions.create(model="m", messages=QUESTION, reasoning_effort="low", max_tokens=4)
    assert out.edge_ms["n"] == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_ms.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_serve_command(converted):
    model = str(converted("tiny-qwen2", "f32"))
    port = free_port()
    proc = cli(
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--queue-size",
        "2",
        "--api-key",
        "k",
        "--threads",
        "1",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "edge-ms serve did not come up"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["queue"]["capacity"] == 2
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = client.chat.completions.create(
            model="m", messages=QUESTION, reasoning_effort="low", max_tokens=6
        )
        assert out.edge_ms["n"] == 2 and out.model == "tiny-qwen2-f32"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    # Ctrl-C stops it after a graceful shutdown; the CLI reports that as it does for every command.
    assert proc.returncode == 130 and err.rstrip().endswith("interrupted"), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "extra, words", [(["--queue-size", "0"], "--queue-size 0"), (["--port", "TAKEN"], "cannot listen")]
)
def test_serve_refuses_with_one_line(converted, extra, words):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [a.replace("TAKEN", str(taken.getsockname()[1])) for a in extra]
        proc = cli("serve", "--model", str(converted("tiny-qwen2", "f32")), *args, env={**os.environ})
        _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert (
        proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    ), err
