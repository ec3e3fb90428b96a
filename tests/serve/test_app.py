"""The HTTP layer in-process, before a model is ready: /health says 503 and the API answers 503 in OpenAI's shape."""

from fastapi.testclient import TestClient

from llamakit.serve.app import ServerState, create_app


def test_health_and_the_api_say_503_while_the_model_loads():
    client = TestClient(create_app(ServerState(model_name="m")))
    assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
    response = client.post("/v1/completions", json={"model": "m", "prompt": "Hi"})
    assert response.status_code == 503 and "still loading" in response.json()["error"]["message"]
    assert client.get("/metrics").status_code == 200  # no key set: open
