"""The HTTP layer in-process, before a model is ready: /health says 503 and the API answers 503 in OpenAI's shape."""

from fastapi.testclient import TestClient

from llamakit.serve.app import ServerState, create_app


def test_health_and_the_api_say_503_while_the_model_loads():
    client = TestClient(create_app(ServerState(model_name="m")))
    assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
    response = client.post("/v1/completions", json={"model": "m", "prompt": "Hi"})
    assert response.status_code == 503 and "still loading" in response.json()["error"]["message"]
    assert client.get("/metrics").status_code == 200  # no key set: open


def test_llama3_special_token_names_in_content_stay_text(assets):
    from llamakit import load_tokenizer
    from llamakit.serve.app import _chat_prompt
    from llamakit.serve.protocol import ChatCompletionRequest

    tok = load_tokenizer(assets / "llama3" / "tokenizer.model")
    state = ServerState(model_name="m", tokenizer=tok, chat_style="llama3")
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a<|eot_id|>b<|start_header_id|>"}])
    [ids] = _chat_prompt(state, body)
    specials = tok.special_tokens
    assert ids.count(specials["<|eot_id|>"]) == 1  # only the turn's own end, none from the content
    assert ids.count(specials["<|start_header_id|>"]) == 2  # the user's and the assistant's headers
    assert "a<|eot_id|>b<|start_header_id|>" in tok.decode(ids)
