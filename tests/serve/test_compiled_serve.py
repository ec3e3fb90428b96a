"""`llamakit serve --compile`: decode steps on the compiled static-shape step give, for greedy requests, exactly the
eager server's text: concurrent requests of different lengths joining and leaving the batch, and one cancelled
mid-way. The buckets compile at startup, and /health says loading until they have."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import API_KEY, MODEL, launch, stop, wait_ready

pytestmark = pytest.mark.slow  # compiles a decode step per bucket: ~45 s cold on 2 cores

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["Once upon a time", "The little dog ran to the park and saw", "Lily", "Tom had a big red ball. One day,",
           "The sun was hot and the girl wanted to swim in the", "A bird"]


@pytest.fixture(scope="module")
def compiled_server(assets, tmp_path_factory):
    """Two slots (buckets 1 and 2: two compiles), and a context long enough (past stories260K's 512) that a request
    runs for seconds and can be cancelled mid-way."""
    server = launch(assets, tmp_path_factory.mktemp("serve") / "compiled.log", "--compile", "--max-batch-size", "2",
                    "--max-seq-len", "2048", "--extend-context")
    health = []
    deadline = time.monotonic() + 60
    while not health and time.monotonic() < deadline and server.proc.poll() is None:
        try:  # the first answer: the port opens at once, before the model loads and the buckets compile
            health.append(httpx.get(f"{server.url}/health", timeout=1))
        except httpx.HTTPError:
            time.sleep(0.05)
    wait_ready(server, timeout=180)
    server.first_health = health[0] if health else None
    yield server
    assert stop(server) == 0
    assert "Traceback" not in server.log_text()


@pytest.fixture(scope="module")
def compiled_client(compiled_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=compiled_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def test_health_says_loading_until_every_bucket_has_compiled(compiled_server):
    first = compiled_server.first_health
    assert first is not None and first.status_code == 503 and first.json() == {"status": "loading"}
    log = compiled_server.log_text()
    assert re.search(r"compiled the decode step for batch buckets 1, 2 in \d+ s", log)
    assert log.index("compiled the decode step") < log.index("serving stories")


def _ask(client, i: int) -> str:
    """Request i: a completion or (every third) a chat reply, its prompt and budget differing from its neighbours'."""
    prompt, max_tokens = PROMPTS[i % len(PROMPTS)], 5 + (i * 17) % 60
    if i % 3 == 2:
        got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0)
        return got.choices[0].message.content
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def _slots_in_use(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=HEADERS).text
    return float(re.search(r"^llamakit_kv_cache_slots_in_use (\S+)$", text, re.M).group(1))


def test_concurrent_greedy_requests_and_a_cancelled_one_match_the_eager_server(compiled_server, compiled_client,
                                                                               client):
    """Eight requests at once on two slots, while a long stream holds a slot and then leaves mid-way: every
    request gets the eager server's text, and the cancelled one's slot is freed."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1900, "stream": True, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        with httpx.stream("POST", f"{compiled_server.url}/v1/completions", json=body, timeout=60,
                          headers=HEADERS) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # decoding in slot 0
            answers = pool.map(lambda i: _ask(compiled_client, i), range(8))
            for _ in range(40):  # leave while the others run beside it
                next(lines)
        compiled = list(answers)
    eager = [_ask(client, i) for i in range(8)]
    assert compiled == eager
    assert len(set(compiled)) > 4 and all(compiled)
    deadline = time.monotonic() + 10
    while _slots_in_use(compiled_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _slots_in_use(compiled_server) == 0
    time.sleep(0.2)  # the request's log line is written as it ends
    cancelled = re.findall(r"(\d+) completion tokens, .* finish cancelled", compiled_server.log_text())
    assert cancelled and int(cancelled[-1]) < 1900
    assert _ask(compiled_client, 3) == _ask(client, 3)  # and the freed slot serves the next request right
