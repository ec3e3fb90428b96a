"""Continuous batching under load: many requests at once each get exactly what they get alone; a client that leaves
frees its slot; a full queue answers 429 and the server goes on."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import API_KEY, MODEL, expected_chat, expected_completion, served, start_server, stop

WORDS = ["cat", "dog", "sun", "tree", "girl", "boy", "ball", "park", "cake", "bird", "fish", "star", "moon", "rain",
         "king", "frog"]


def _requests(count: int):
    """Prompts and budgets that differ, so rows join and leave the batch at different steps."""
    for i in range(count):
        prompt = f"Once upon a time, a {WORDS[i % 16]} and a {WORDS[(i * 7 + 3) % 16]}"
        yield i, prompt, 8 + (i * 13) % 50


def test_64_requests_32_at_once_each_equal_to_running_alone(client, reference):
    def run(item):
        i, prompt, max_tokens = item
        if i % 4 == 3:
            messages = [{"role": "user", "content": prompt}]
            got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
            return i, got.choices[0].message.content
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return i, got.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = dict(pool.map(run, list(_requests(64))))
    assert sorted(answers) == list(range(64))  # none lost or duplicated
    for i, prompt, max_tokens in _requests(64):
        if i % 4 == 3:
            _, expected = expected_chat(reference, [{"role": "user", "content": prompt}], max_tokens)
        else:
            expected = expected_completion(reference, prompt, max_tokens)[1].text
        assert answers[i] == expected, f"request {i} differs from running alone"


def _cancelled(server) -> list[int]:
    """Completion tokens of each request the server's log shows as cancelled, oldest first."""
    time.sleep(0.2)  # the line is written as the request ends
    return [int(n) for n in re.findall(r"(\d+) completion tokens, .* finish cancelled", server.log_text())]


def _slots_in_use(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return float(re.search(r"^llamakit_kv_cache_slots_in_use (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def long_server(assets, tmp_path_factory):
    """A context long enough (4096, past stories260K's 512) that a request runs for seconds."""
    yield from served(assets, tmp_path_factory, "long", "--max-seq-len", "4096", "--extend-context")


def test_a_client_that_leaves_frees_its_slot(long_server):
    server = long_server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    before = len(_cancelled(server))
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert _slots_in_use(server) == 1
    deadline = time.monotonic() + 10
    while _slots_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _slots_in_use(server) == 0 and _cancelled(server)[before:] and max(_cancelled(server)[before:]) < 4000


def test_a_client_that_leaves_a_plain_request_frees_its_slot_too(long_server):
    server = long_server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
    before = len(_cancelled(server))
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 10
    while _slots_in_use(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _slots_in_use(server) == 0 and _cancelled(server)[before:] and max(_cancelled(server)[before:]) < 4000
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def tiny_queue(assets, tmp_path_factory):
    yield from served(assets, tmp_path_factory, "tiny", "--max-batch-size", "1", "--max-waiting", "1")


def test_a_full_queue_answers_429_and_the_server_goes_on(tiny_queue):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 500, "ignore_eos": True}

    def post(_):
        return httpx.post(f"{tiny_queue.url}/v1/completions", json=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(post, 0)
        deadline = time.monotonic() + 30
        while not _slots_in_use(tiny_queue) and time.monotonic() < deadline:  # the one slot is taken
            time.sleep(0.01)
        statuses = sorted(pool.map(post, range(3)))  # one may wait; with the queue full, the rest are refused
    assert running.result() == 200
    assert 200 in statuses and 429 in statuses, statuses
    assert post(0) == 200


def test_sigterm_drains_running_requests_and_exits_cleanly(assets, tmp_path):
    server = start_server(assets, tmp_path / "drain.log")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        deadline = time.monotonic() + 10
        while _slots_in_use(server) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop(server) == 0  # SIGTERM while the request runs
        response = running.result()
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 200
    log = server.log_text()
    assert "Traceback" not in log and "shutting down" in log
    assert re.search(r"cmpl-\w+: \d+ prompt tokens, 200 completion tokens, first token [\d.]+ s", log)


def test_metrics_report_requests_tokens_slots_and_latencies(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = dict(re.findall(r"^(llamakit_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert float(values["llamakit_kv_cache_slots"]) == 8
    assert float(values["llamakit_prompt_tokens_total"]) > 0 and float(values["llamakit_generation_tokens_total"]) >= 4
    assert float(values['llamakit_requests_total{route="/v1/completions",status="200"}']) >= 1
    for gauge in ("llamakit_requests_running", "llamakit_requests_waiting", "llamakit_kv_cache_slots_in_use"):
        assert float(values[gauge]) == 0  # nothing in flight now
    for histogram in ("llamakit_time_to_first_token_seconds", "llamakit_time_per_output_token_seconds"):
        assert float(values[f"{histogram}_count"]) > 0
