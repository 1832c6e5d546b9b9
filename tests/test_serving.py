"""predict.py --serve: the OpenAI-compatible API, /v1/ner, limits, errors and the page, on a tiny model over loopback."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import predict
from cnqlora.cli import run_command
from cnqlora.data import encode_text
from cnqlora.generation import GenerationArgs, answer_many
from cnqlora.inference import Item, PredictArgs, prompt_ids
from cnqlora.msra import QUERY_PREFIX, SEED_INSTRUCTION
from cnqlora.serving import ServeArgs, ServerThread, Service, locate_entities

KEY = "test-key-123"
TYPES = ["人名", "地名", "机构名"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_service(loaded, *, stop_ids=None, batch_size=4, **serve) -> Service:
    args = PredictArgs(instruct="msra", types=TYPES)
    args.validate()
    options = dict(api_key=KEY, max_context=256, max_tokens_limit=64, max_queue=32, max_body_bytes=8192)
    options.update(serve)
    return Service(loaded, args, GenerationArgs(max_new_tokens=16, batch_size=batch_size), ServeArgs(**options),
                   TYPES, stop_ids=stop_ids, model_name="tiny-ner")


@pytest.fixture(scope="module")
def server(loaded):
    running = ServerThread(make_service(loaded))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def queries(ner_data_dir):
    with open(f"{ner_data_dir}/test.txt", encoding="utf-8") as f:
        return [json.loads(line)["query"] for line in f][:16]


def offline(loaded, ids, max_new_tokens):
    """The file-mode answer (answer_many through the engine, alone) for prompt ids."""
    return answer_many(loaded.model, loaded.tokenizer, [ids], GenerationArgs(max_new_tokens=max_new_tokens))[0]


def chat_ids(loaded, query):
    return prompt_ids(loaded.tokenizer, loaded.template, Item(SEED_INSTRUCTION, query, None), True)


def chat(client, query, **kwargs):
    return client.chat.completions.create(model="tiny-ner", messages=[
        {"role": "system", "content": SEED_INSTRUCTION}, {"role": "user", "content": query}], **kwargs)


def raw(server, method, path, body=None, headers=None, key=KEY):
    """(status, parsed JSON) of one request with http.client: for what the openai client cannot send."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload), dict(response.getheaders())


# --------------------------------------------------------------------------- the openai client


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-ner"]
    status, health, _ = raw(server, "GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["slots"] == 4 and health["max_context"] == 256


def test_chat_answers_as_file_mode_with_usage(client, loaded, queries):
    ids = chat_ids(loaded, queries[0])
    reply = chat(client, queries[0], max_tokens=12)
    assert reply.choices[0].message.content == offline(loaded, ids, 12)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(ids)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")


def test_a_user_message_alone_takes_the_servers_instruction(client, loaded, queries):
    # --instruct msra: the user types only the sentence, the query prefix is added as in the terminal chat
    sentence = queries[1][len(QUERY_PREFIX):]
    reply = client.chat.completions.create(model="tiny-ner", messages=[{"role": "user", "content": sentence}],
                                           max_tokens=10)
    assert reply.choices[0].message.content == offline(loaded, chat_ids(loaded, QUERY_PREFIX + sentence), 10)


def test_streaming_gives_the_same_text_in_openai_chunks(client, queries):
    whole = chat(client, queries[2], max_tokens=14)
    chunks = list(chat(client, queries[2], max_tokens=14, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one piece


def test_16_concurrent_requests_answer_as_sequential_ones(client, queries):
    sequential = [chat(client, q, max_tokens=10).choices[0].message.content for q in queries]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda q: chat(client, q, max_tokens=10).choices[0].message.content, queries))
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # distinct prompts: a mix-up between requests would show


def test_completions_are_raw_text_completion(client, loaded):
    prompt = "北京大学的学生"
    reply = client.completions.create(model="tiny-ner", prompt=prompt, max_tokens=9)
    assert reply.choices[0].text == offline(loaded, encode_text(loaded.tokenizer, prompt), 9)
    assert reply.usage.prompt_tokens == len(encode_text(loaded.tokenizer, prompt))
    streamed = list(client.completions.create(model="tiny-ner", prompt=prompt, max_tokens=9, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_a_stop_string_ends_the_answer_before_it(client, server, queries):
    full = chat(client, queries[3], max_tokens=24)
    text = full.choices[0].message.content
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = text[:text.find(stop)]
    reply = chat(client, queries[3], max_tokens=24, stop=[stop, "never-seen-stop"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < full.usage.completion_tokens or full.choices[0].finish_reason == "stop"
    streamed = list(chat(client, queries[3], max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    # a stop string ends the request in the engine, but it is answered, not abandoned
    assert server.service.counts["cancelled"] == 0


def test_an_engine_failure_is_500_for_the_waiting_request_and_503_after(loaded):
    service = make_service(loaded)

    def broken(*_):
        raise RuntimeError("CUDA out of memory (simulated)")

    service.engine._prefill = broken
    running = ServerThread(service)
    try:
        status, payload, _ = raw(running, "POST", "/v1/completions", {"prompt": "北京", "max_tokens": 4})
        assert status == 500 and payload["error"]["code"] == "engine_failed"
        assert "server's log" in payload["error"]["message"] and "Traceback" not in json.dumps(payload)
        status, health, _ = raw(running, "GET", "/health", key=None)
        assert status == 503 and health["status"] == "error" and "out of memory" in health["error"]
        status, payload, _ = raw(running, "POST", "/v1/completions", {"prompt": "北京", "max_tokens": 4})
        assert status == 503 and payload["error"]["code"] == "engine_failed"
    finally:
        running.stop()


def test_a_seed_makes_sampling_repeatable_whatever_else_runs(client, queries):
    one = chat(client, queries[4], max_tokens=12, temperature=1.5, seed=7).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(chat, client, q, max_tokens=12) for q in queries[5:8]]
        again = chat(client, queries[4], max_tokens=12, temperature=1.5, seed=7).choices[0].message.content
        [f.result() for f in others]
    assert again == one
    draws = {chat(client, queries[4], max_tokens=12, temperature=1.5, seed=s).choices[0].message.content
             for s in range(1, 6)}
    assert len(draws) > 1  # the seed is used: other seeds sample other answers


# --------------------------------------------------------------------------- NER


def test_ner_answers_grounded_entities_with_offsets(server, queries):
    text = queries[5][len(QUERY_PREFIX):]
    status, result, _ = raw(server, "POST", "/v1/ner", {"text": text, "max_tokens": 40})
    assert status == 200, result
    assert result["well_formed"] and result["types"] == TYPES and result["text"] == text
    for e in result["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and e["type"] in TYPES
    status, only, _ = raw(server, "POST", "/v1/ner", {"text": text, "types": ["地名"], "max_tokens": 40})
    assert status == 200 and all(e["type"] == "地名" for e in only["entities"])
    assert all(line == "没有" or line.endswith("_地名") for line in only["answer"].split("\n"))


def test_grounded_chat_answers_only_with_entities_of_the_text(server, client, queries):
    from cnqlora.metrics import parse_answer

    server.service.args.grounded = True  # as --grounded: the user message's text grounds the answer
    try:
        for query in queries[8:11]:
            answer = chat(client, query, max_tokens=40).choices[0].message.content
            parsed = parse_answer(answer, TYPES)
            assert parsed.well_formed, answer
            assert all(entity in query for entity, _ in parsed.entities), answer
    finally:
        server.service.args.grounded = False
    free = [chat(client, q, max_tokens=40).choices[0].message.content for q in queries[8:11]]
    assert not all(parse_answer(a, TYPES).well_formed for a in free)  # the grounding did the work


def test_entity_offsets_cover_every_mention_and_never_overlap():
    text = "北京大学在北京，北京大学很大。张三"
    spans, unplaced = locate_entities(text, [("北京", "地名"), ("北京大学", "机构名"), ("张三", "人名"),
                                             ("张三", "机构名"), ("上海", "地名")])
    assert [(s["text"], s["type"], s["start"], s["end"]) for s in spans] == [
        ("北京大学", "机构名", 0, 4), ("北京", "地名", 5, 7), ("北京大学", "机构名", 8, 12), ("张三", "人名", 15, 17)]
    assert unplaced == [{"text": "张三", "type": "机构名"}, {"text": "上海", "type": "地名"}]
    spans, _ = locate_entities("𠀋京𠀋京", [("𠀋京", "地名")])  # offsets in code points, not UTF-16 units
    assert [(s["start"], s["end"]) for s in spans] == [(0, 2), (2, 4)]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method,path,body,key,status,code", [
    ("GET", "/v1/models", None, None, 401, "invalid_api_key"),
    ("GET", "/v1/models", None, "wrong", 401, "invalid_api_key"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None, 401, "invalid_api_key"),
    ("GET", "/v1/nothing", None, KEY, 404, "not_found"),
    ("GET", "/v1/chat/completions", None, KEY, 405, "method_not_allowed"),
    ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, KEY, 404,
     "model_not_found"),
    ("POST", "/v1/chat/completions", b"{not json", KEY, 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b"[1, 2]", KEY, 400, "invalid_json"),
    ("POST", "/v1/chat/completions", {"messages": []}, KEY, 422, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, KEY, 422, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, KEY,
     422, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, KEY, 422,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                      "content": "b"}, {"role": "user", "content": "c"}]}, KEY, 400,
     "multi_turn_unsupported"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, KEY, 400, "invalid_messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, KEY, 400,
     "unsupported_content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, KEY, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, KEY, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, KEY, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, KEY,
     400, "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "北" * 300}]}, KEY, 400,
     "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, KEY, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "a", "seed": 2**64}, KEY, 422, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": ""}, KEY, 400, "invalid_value"),
    ("POST", "/v1/ner", {"text": ""}, KEY, 422, "invalid_value"),
    ("POST", "/v1/ner", {"text": "北京", "types": ["地_名"]}, KEY, 422, "invalid_value"),
    ("POST", "/v1/ner", {"text": "北京", "max_tokens": 1}, KEY, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", b"{" + b" " * 9000 + b"}", KEY, 413, "request_too_large"),
])
def test_bad_requests_get_openai_error_json(server, method, path, body, key, status, code):
    got, payload, _ = raw(server, method, path, body, key=key)
    assert got == status, payload
    error = payload["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in error["message"]
    assert error["type"] == {401: "authentication_error"}.get(status, "invalid_request_error")


def test_a_chunked_body_over_the_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"x" * 9000, b'"}']),
                 headers={"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_the_openai_client_sees_typed_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --------------------------------------------------------------------------- load, queue, disconnects


def test_a_bounded_load_test_on_loopback(server, client, queries):
    before = raw(server, "GET", "/health", key=None)[1]["completed"]
    calls = [lambda q=q: chat(client, q, max_tokens=6).choices[0].message.content for q in queries] + \
            [lambda q=q: "".join(c.choices[0].delta.content or "" for c in chat(client, q, max_tokens=6, stream=True))
             for q in queries] + \
            [lambda q=q: raw(server, "POST", "/v1/ner", {"text": q[len(QUERY_PREFIX):], "max_tokens": 40})[1]["answer"]
             for q in queries[:8]]
    started = time.time()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda call: call(), calls))
    assert time.time() - started < 60
    assert answers[:16] == answers[16:32]  # streamed = not streamed, under load
    health = raw(server, "GET", "/health", key=None)[1]
    assert health["completed"] - before == len(calls) and health["requests"] == 0


def open_stream(port, max_tokens):
    """A streaming completion on a raw socket, after its first chunk came (it then holds a slot)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "北京", "max_tokens": max_tokens,
                                                              "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return conn, response


def wait_for(predicate, seconds=20.0):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(loaded):
    # one slot, one waiting place, and answers that never stop early (no stop token): 500 tokens
    running = ServerThread(make_service(loaded, stop_ids=[], batch_size=1, max_queue=1, max_context=600,
                                   max_tokens_limit=500))
    try:
        health = lambda: raw(running, "GET", "/health", key=None)[1]  # noqa: E731
        first = open_stream(running.port, 500)
        second = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        second.request("POST", "/v1/completions", body=json.dumps({"prompt": "上海", "max_tokens": 500}),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        wait_for(lambda: health()["requests"] == 2)
        status, payload, headers = raw(running, "POST", "/v1/completions", {"prompt": "中国", "max_tokens": 5})
        assert status == 429 and payload["error"]["code"] == "queue_full" and headers.get("retry-after") == "1"
        first[0].close()  # mid-stream
        second.close()  # while waiting, not streaming
        wait_for(lambda: health()["requests"] == 0)
        assert health()["cancelled"] == 2 and health()["completed"] == 0
        status, payload, _ = raw(running, "POST", "/v1/completions", {"prompt": "中国", "max_tokens": 5})
        assert status == 200 and payload["usage"]["completion_tokens"] == 5  # the freed slot serves again
    finally:
        running.stop()


# --------------------------------------------------------------------------- the command


def serve_argv(model_dir, *extra):
    return ["--serve", "--base_model", model_dir, "--only_cpu", "--host", "127.0.0.1", *extra]


def test_options_are_checked_before_the_model_loads(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    missing = str(tmp_path / "no-model")  # never read: every error below comes first
    try:
        assert run_command(predict.main, serve_argv(missing, "--port", port)) == 2
        assert "already in use" in capsys.readouterr().err
    finally:
        taken.close()
    cases = [(["--api_key", f"@{tmp_path}/absent.txt"], "cannot read"),
             (["--api_key", f"@{tmp_path}"], "cannot read"),
             (["--api_key", "two words"], "spaces"),
             (["--port", "70000"], "between 0 and 65535"),
             (["--data_file", "x.jsonl"], "leave out --interactive and --data_file"),
             (["--repetition_penalty", "1.2"], "--repetition_penalty"),
             (["--max_context", "0"], "--max_context must be at least 1")]
    (tmp_path / "empty.txt").write_text("\n")
    cases.append((["--api_key", f"@{tmp_path}/empty.txt"], "is empty"))
    for extra, message in cases:
        assert run_command(predict.main, serve_argv(missing, *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_predict_serve_runs_and_sigterm_drains_the_running_request(tiny_ner_model_dir, adapter_dir, tmp_path):
    (tmp_path / "key.txt").write_text(KEY + "\n")
    proc = subprocess.Popen([sys.executable, "predict.py", *serve_argv(tiny_ner_model_dir, "--port", "0"),
                             "--lora_model", adapter_dir, "--api_key", f"@{tmp_path}/key.txt", "--batch_size", "2",
                             "--types", ",".join(TYPES)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn, response = open_stream(port, 40)
        proc.send_signal(signal.SIGTERM)
        rest = response.read().decode()  # the running request is finished, not cut
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "' in rest
        assert proc.wait(30) == 0
        assert "stopped (1 answered, 0 cancelled)" in proc.stdout.read()
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- the page


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no extra package.

    --dump-dom cannot wait for a streamed answer (virtual time runs on while a body streams in).
    """

    def __init__(self, binary: str) -> None:
        self.ours_read, theirs_write = os.pipe()
        theirs_read, self.ours_write = os.pipe()

        def fds():
            a, b = os.dup(theirs_read), os.dup(theirs_write)  # 3 and 4 may be the pipes themselves
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(theirs_read)
        os.close(theirs_write)
        self.calls, self.pending = 0, b""

    def call(self, method: str, session: str | None = None, **params):
        self.calls += 1
        message = {"id": self.calls, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.ours_write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.pending:
                chunk = os.read(self.ours_read, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self.pending += chunk
            line, self.pending = self.pending.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.calls:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, session: str, expression: str):
        return self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            self.proc.wait(10)
            os.close(self.ours_read)
            os.close(self.ours_write)


@pytest.mark.skipif(chromium() is None, reason="no chromium binary: install the Debian package (apt-get install "
                    "chromium, as .ci/run does) to check the page in a headless browser")
def test_the_page_streams_a_chat_answer_and_highlights_entities(server, client, queries):
    from urllib.parse import urlencode

    found = [(q[len(QUERY_PREFIX):], raw(server, "POST", "/v1/ner", {"text": q[len(QUERY_PREFIX):]})[1])
             for q in queries[6:12]]
    text, expected = next((t, r) for t, r in found if r["entities"])  # something to highlight
    answer = client.chat.completions.create(model="tiny-ner", messages=[{"role": "user", "content": text}])
    browser = Browser(chromium())
    try:
        page = browser.open(f"{server.url}/?{urlencode({'key': KEY, 'message': text, 'text': text})}")
        states = "[answer, entities].map((e) => e.dataset.state).join()"
        wait_for(lambda: browser.evaluate(page, states) in ("done,done",), 60)
        assert browser.evaluate(page, "answer.textContent") == answer.choices[0].message.content
        assert browser.evaluate(page, "answer.dataset.finish") == answer.choices[0].finish_reason
        marks = browser.evaluate(page, "[...entities.querySelectorAll('mark')].map((m) => [m.dataset.type, "
                                       "m.firstChild.textContent])")
        assert marks == [[e["type"], e["text"]] for e in expected["entities"]]
        # the text around the marks is the input, unchanged
        shown = browser.evaluate(page, "[...entities.childNodes].map((n) => n.nodeType === 3 ? n.textContent : "
                                       "n.firstChild.textContent).join('')")
        assert shown == text
        assert browser.evaluate(page, "document.getElementById('model').textContent") == "tiny-ner"
        # an error is shown as the server's message, not as a broken page
        page = browser.open(f"{server.url}/?{urlencode({'key': 'wrong', 'message': text})}")
        wait_for(lambda: browser.evaluate(page, "answer.dataset.state") == "error", 60)
        assert "API key" in browser.evaluate(page, "answer.textContent")
    finally:
        browser.close()
