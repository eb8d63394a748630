"""The assistant (seed 004): /chat with its sessions and #generate, /analyze-image, /prompt/enhance, through Ollama.

Ollama is tests/fake_ollama.py, a real HTTP server on a loopback port speaking
Ollama's protocol; the service is the real app with the demo models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from imagine.http.app_keys import registry_key
from imagine.settings import Settings
from tests.conftest import auth
from tests.fake_ollama import FakeOllama
from tests.processes import LOOPBACK, free_port

CHAT = "/imagine/chat"
SESSIONS = "/imagine/chat/sessions"
ANALYZE = "/imagine/analyze-image"
ENHANCE = "/imagine/prompt/enhance"


@pytest.fixture(autouse=True)
def no_ollama_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client library reads it by itself: each test says what it sends.
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)


def with_assistant(settings: Settings, url: str, **assistant: Any) -> Settings:
    # Two steps for the default model: `#generate` stays quick.
    options = {**settings.models.options, "sdxl": {**settings.models.options["sdxl"], "default_steps": 2}}
    return settings.replace(
        models={"options": options},
        assistant={"ollama_url": url, "connect_timeout_s": 2.0, "timeout_s": 5.0, **assistant},
    )


@pytest.fixture
def fake() -> FakeOllama:
    return FakeOllama()


@pytest.fixture
async def ollama_url(aiohttp_server: Callable[..., Any], fake: FakeOllama) -> str:
    server = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def settings(base_settings: Settings, ollama_url: str) -> Settings:
    return with_assistant(base_settings, ollama_url)


@pytest.fixture
async def client(make_client: Callable[..., Any], settings: Settings) -> Any:
    return await make_client(settings)


def png_base64(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (255, 0, 0), kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode()


async def chat(client: Any, message: str, sub: str = "alice", claims: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    response = await client.post(CHAT, json={"message": message, **fields}, headers=auth(sub, **(claims or {})))
    assert response.status == 200, await response.text()
    return await response.json()


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-Sent Events as (event, data) pairs."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        found.append((fields["event"], json.loads(fields["data"])))
    return found


# ---- conversations ----------------------------------------------------------------------


async def test_sessions_keep_their_history_and_belong_to_their_subject(client, fake) -> None:
    first = await chat(client, "Hello! How are you today?", session_id="user_123")
    assert first == {"response": "You said: Hello! How are you today? I remember 0 earlier messages.", "session_id": "user_123"}
    second = await chat(client, "And now?", session_id="user_123")
    assert second["response"].endswith("I remember 2 earlier messages.")
    # The model saw the system prompt, the earlier exchange and the new message.
    assert [message["role"] for message in fake.chats[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert fake.chats[-1]["options"] == {"temperature": 0.7, "num_predict": 256}

    # Bob's "user_123" is his own: he sees nothing of Alice's.
    assert (await chat(client, "Hi", sub="bob", session_id="user_123"))["response"].endswith("I remember 0 earlier messages.")
    assert (await chat(client, "Hi"))["session_id"] == "default"

    listed = await (await client.get(SESSIONS, headers=auth())).json()
    assert [(s["session_id"], s["messages"]) for s in listed["sessions"]] == [("default", 2), ("user_123", 4)]
    assert listed["sessions"][0]["updated_at"].endswith("Z")
    kept = await (await client.get(f"{SESSIONS}/user_123", headers=auth())).json()
    assert [(m["role"], m["content"]) for m in kept["messages"]][:2] == [
        ("user", "Hello! How are you today?"),
        ("assistant", first["response"]),
    ]
    bobs = await (await client.get(f"{SESSIONS}/user_123", headers=auth("bob"))).json()
    assert [m["content"] for m in bobs["messages"]] == ["Hi", "You said: Hi I remember 0 earlier messages."]

    assert (await client.get(f"{SESSIONS}/default", headers=auth("carol"))).status == 404
    assert (await client.delete(f"{SESSIONS}/user_123", headers=auth("carol"))).status == 404
    assert (await client.delete(f"{SESSIONS}/user_123", headers=auth())).status == 204
    assert (await client.get(f"{SESSIONS}/user_123", headers=auth())).status == 404
    # Bob's session of the same name is untouched.
    assert (await client.get(f"{SESSIONS}/user_123", headers=auth("bob"))).status == 200


async def test_history_is_bounded_and_options_reach_the_model(make_client, base_settings, ollama_url, fake) -> None:
    client = await make_client(with_assistant(base_settings, ollama_url, max_history_messages=4, max_sessions=2))
    for number in range(3):
        await chat(client, f"message {number}")
    kept = await (await client.get(f"{SESSIONS}/default", headers=auth())).json()
    assert [m["content"] for m in kept["messages"] if m["role"] == "user"] == ["message 1", "message 2"]
    answer = await chat(client, "Write a short story about a magical forest", temperature=0.9, max_tokens=3)
    assert answer["response"] == "You said: Write "  # three tokens
    assert fake.chats[-1]["options"] == {"temperature": 0.9, "num_predict": 3}
    assert len(fake.chats[-1]["messages"]) == 1 + 4 + 1
    # Two sessions at most: the least recently used goes.
    await chat(client, "x", session_id="second")
    await chat(client, "x", session_id="third")
    listed = await (await client.get(SESSIONS, headers=auth())).json()
    assert [s["session_id"] for s in listed["sessions"]] == ["third", "second"]


async def test_sessions_survive_a_restart(make_client, settings) -> None:
    first = await make_client(settings)
    await chat(first, "Remember the dragon", session_id="art_session")
    await first.close()
    second = await make_client(settings)
    kept = await (await second.get(f"{SESSIONS}/art_session", headers=auth())).json()
    assert [m["content"] for m in kept["messages"]][0] == "Remember the dragon"
    assert (await chat(second, "And?", session_id="art_session"))["response"].endswith("I remember 2 earlier messages.")


async def test_the_body_is_checked(client) -> None:
    for body, field in (
        ({"message": ""}, "message"),
        ({"message": "   "}, "message"),
        ({"message": "hi", "temperature": 2.5}, "temperature"),
        ({"message": "hi", "max_tokens": 0}, "max_tokens"),
        ({"message": "hi", "session_id": "../etc"}, "session_id"),
        ({"message": "hi", "colour": "red"}, "colour"),
    ):
        response = await client.post(CHAT, json=body, headers=auth())
        assert response.status == 400, body
        assert (await response.json())["error"]["details"]["errors"][0]["loc"] == ["body", field]
    assert (await client.post(CHAT, json={"message": "hi"}, headers=auth(scope="metrics"))).status == 403


# ---- streaming ----------------------------------------------------------------------------


async def test_streaming_yields_the_same_text_as_the_whole_answer(client, fake) -> None:
    whole = await chat(client, "Tell me about dragons", session_id="whole")
    streamed = await client.post(CHAT, json={"message": "Tell me about dragons", "session_id": "streamed", "stream": True}, headers=auth())
    assert streamed.status == 200 and streamed.content_type == "text/event-stream"
    found = events(await streamed.text())
    tokens = [data["text"] for event, data in found if event == "token"]
    assert len(tokens) > 3
    assert found[-1] == ("done", {"response": whole["response"], "session_id": "streamed"})
    assert "".join(tokens) == whole["response"]
    # Accept: text/event-stream asks for the same; the streamed exchange was kept like any other.
    by_accept = await client.post(
        CHAT, json={"message": "Again", "session_id": "streamed"}, headers={**auth(), "Accept": "text/event-stream"}
    )
    assert events(await by_accept.text())[-1][1]["response"].endswith("I remember 2 earlier messages.")
    assert fake.chats[-1]["stream"] is True


async def test_streamed_answers_count_against_the_callers_open_streams(make_client, base_settings, ollama_url, fake) -> None:
    client = await make_client(with_assistant(base_settings, ollama_url).replace(jobs={"max_streams_per_subject": 1}))
    fake.token_delay_s = 0.2
    first = await client.post(CHAT, json={"message": "one two three four", "stream": True}, headers=auth())
    assert first.status == 200
    second = await client.post(CHAT, json={"message": "Hello", "stream": True}, headers=auth())
    assert second.status == 429 and (await second.json())["error"]["details"]["bucket"] == "streams"
    # An answer that is not streamed holds no stream; another caller has streams of its own.
    fake.token_delay_s = 0.0
    assert (await client.post(CHAT, json={"message": "Hello"}, headers=auth())).status == 200
    assert (await client.post(CHAT, json={"message": "Hello", "stream": True}, headers=auth("bob"))).status == 200
    await first.text()
    assert (await client.post(CHAT, json={"message": "Hello", "stream": True}, headers=auth())).status == 200


async def test_a_model_failing_midway_ends_the_stream_with_an_error_and_keeps_nothing(client, fake) -> None:
    fake.fail_after_tokens = 2
    response = await client.post(CHAT, json={"message": "Tell me a long story", "stream": True}, headers=auth())
    found = events(await response.text())
    assert [event for event, _ in found] == ["token", "token", "error"]
    assert found[-1][1]["error"]["code"] == "UPSTREAM_ERROR"
    assert (await client.get(f"{SESSIONS}/default", headers=auth())).status == 404


async def test_a_server_that_does_not_answer_as_ollama_does_is_a_502_even_midway(client, fake) -> None:
    fake.garbage = [1]
    response = await client.post(CHAT, json={"message": "Hello there"}, headers=auth())
    assert response.status == 502 and (await response.json())["error"]["code"] == "UPSTREAM_ERROR"
    # Streamed: the first token went out, then the stream ends with an error event, not a second answer.
    response = await client.post(CHAT, json={"message": "Tell me a long story", "stream": True}, headers=auth())
    found = events(await response.text())
    assert [event for event, _ in found] == ["token", "error"]
    assert found[-1][1]["error"]["code"] == "UPSTREAM_ERROR"


# ---- #generate ------------------------------------------------------------------------------


async def test_generate_in_a_chat_stores_the_image_and_names_it(client) -> None:
    answer = await chat(client, "#generate a mystical dragon breathing fire", session_id="art_session")
    image_id = answer["image_id"]
    assert answer["image_url"] == f"/imagine/gallery/{image_id}.png"
    assert image_id in answer["response"] and answer["image_url"] in answer["response"]
    gallery = await (await client.get("/imagine/gallery", headers=auth())).json()
    assert [(image["id"], image["prompt"]) for image in gallery["images"]] == [(image_id, "a mystical dragon breathing fire")]
    png = await client.get(answer["image_url"], headers=auth())
    assert png.status == 200 and Image.open(io.BytesIO(await png.read())).size == (64, 64)
    kept = await (await client.get(f"{SESSIONS}/art_session", headers=auth())).json()
    assert kept["messages"][0]["content"] == "#generate a mystical dragon breathing fire"
    assert kept["messages"][1]["image_id"] == image_id

    streamed = await client.post(CHAT, json={"message": "#generate a red fox", "stream": True}, headers=auth())
    found = events(await streamed.text())
    assert [event for event, _ in found] == ["token", "done"]
    assert found[0][1]["text"] == found[1][1]["response"] and found[1][1]["image_id"]


async def test_a_failed_generate_answers_with_its_code(client) -> None:
    # The token's models claim applies as on /generate: the answer says so, the exchange is kept, nothing is stored.
    refused = await chat(client, "#generate a castle", sub="limited", claims={"models": ["sdxl-turbo"]})
    assert "(FORBIDDEN)" in refused["response"] and "image_id" not in refused
    blank = await chat(client, "#generate   ", sub="limited")
    assert "(VALIDATION_ERROR)" in blank["response"]
    assert (await (await client.get("/imagine/gallery", headers=auth("limited"))).json())["total_count"] == 0
    kept = await (await client.get(f"{SESSIONS}/default", headers=auth("limited"))).json()
    assert len(kept["messages"]) == 4


# ---- image analysis ------------------------------------------------------------------------------


async def test_analyze_an_uploaded_image_and_a_gallery_image(client, fake) -> None:
    response = await client.post(ANALYZE, json={"image_base64": png_base64(), "question": "What colour is it?"}, headers=auth())
    assert response.status == 200, await response.text()
    assert await response.json() == {"analysis": "A 64x64 PNG image, mostly red. You asked: What colour is it?"}
    assert fake.chats[-1]["model"] == "llava"
    # A JPEG data URL with the default question.
    data_url = "data:image/jpeg;base64," + png_base64(colour=(0, 0, 250), kind="JPEG")
    described = await (await client.post(ANALYZE, json={"image": data_url}, headers=auth())).json()
    assert described["analysis"].endswith("mostly blue. You asked: Describe this image in detail")

    made = await chat(client, "#generate a green field")
    own = await client.post(ANALYZE, json={"image": f"gallery:{made['image_id']}"}, headers=auth())
    assert own.status == 200 and "64x64" in (await own.json())["analysis"]
    assert (await client.post(ANALYZE, json={"image": f"gallery:{made['image_id']}"}, headers=auth("bob"))).status == 404


async def test_huge_malformed_or_missing_images_are_refused(make_client, base_settings, ollama_url, fake) -> None:
    client = await make_client(with_assistant(base_settings, ollama_url).replace(server={"max_input_pixels": 64 * 64}))
    for body, field, words in (
        ({"image_base64": png_base64((128, 128))}, "image_base64", "more than 4096 pixels"),
        ({"image_base64": "not base64 at all!"}, "image_base64", "not valid base64"),
        ({"image_base64": base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()}, "image_base64", "not a readable PNG"),
        ({"image": png_base64(kind="GIF")}, "image", "GIF"),
    ):
        response = await client.post(ANALYZE, json=body, headers=auth())
        assert response.status == 400, body
        [error] = (await response.json())["error"]["details"]["errors"]
        assert error["loc"] == ["body", field] and words in error["msg"], error
    for body in ({"question": "What is it?"}, {"image": png_base64(), "image_base64": png_base64()}):
        assert (await client.post(ANALYZE, json=body, headers=auth())).status == 400
    assert fake.chats == []


# ---- prompt help ------------------------------------------------------------------------------------


async def test_enhance_writes_a_prompt_for_the_model_from_its_plugins_guide(client, fake) -> None:
    response = await client.post(ENHANCE, json={"prompt": "a fox in snow", "style": "watercolour"}, headers=auth())
    assert response.status == 200, await response.text()
    # The label and quotes the model wrapped it in are gone: it can go to /generate as it is.
    assert await response.json() == {"prompt": "a fox in snow, in watercolour style, intricate detail, soft golden light, wide shot"}
    system = fake.chats[-1]["messages"][0]["content"]
    guide = client.app[registry_key].resolve(None).card.prompt_guide
    assert guide and guide in system
    turbo = client.app[registry_key].resolve("sdxl-turbo")
    await client.post(ENHANCE, json={"prompt": "a fox", "model": "sdxl-turbo"}, headers=auth())
    assert turbo.card.prompt_guide in fake.chats[-1]["messages"][0]["content"]
    generated = await client.post("/imagine/generate", json={"prompt": (await response.json())["prompt"]}, headers=auth())
    assert generated.status == 200
    assert (await client.post(ENHANCE, json={"prompt": "a fox", "model": "dall-e-9"}, headers=auth())).status == 404
    assert (await client.post(ENHANCE, json={"prompt": " "}, headers=auth())).status == 400


# ---- Ollama down, slow or without the model ---------------------------------------------------------------


async def test_ollama_down_answers_503_and_leaves_the_service_healthy(make_client, base_settings, caplog) -> None:
    # A proxy's user name and password in the URL: used to connect, never shown.
    client = await make_client(with_assistant(base_settings, f"http://admin:S3cretPw@{LOOPBACK}:{free_port()}"))
    response = await client.post(CHAT, json={"message": "Hello"}, headers=auth())
    assert response.status == 503
    assert "S3cretPw" not in await response.text()
    body = await response.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE" and "cannot be reached" in body["detail"]
    assert body["error"]["details"]["reason"] == "unreachable" and response.headers["Retry-After"]
    streamed = await client.post(CHAT, json={"message": "Hello", "stream": True}, headers=auth())
    assert streamed.status == 503 and streamed.content_type == "application/json"
    assert (await client.post(ANALYZE, json={"image_base64": png_base64()}, headers=auth())).status == 503
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "healthy"
    assert health["assistant"]["configured"] and not health["assistant"]["reachable"]
    assert "cannot be reached" in health["assistant"]["error"]
    assert f"http://{LOOPBACK}:" in health["assistant"]["error"] and "S3cretPw" not in str(health)
    status = await (await client.get("/imagine/status", headers=auth())).json()
    assert status["models"]["ollama"] is False and status["models"]["multimodal"] is False
    assert "S3cretPw" not in caplog.text


async def test_a_missing_model_answers_503_naming_it(client, fake) -> None:
    fake.models = ["llava:latest"]
    response = await client.post(CHAT, json={"message": "Hello"}, headers=auth())
    assert response.status == 503
    body = await response.json()
    assert body["error"]["details"]["reason"] == "model_missing" and body["error"]["details"]["model"] == "llama3.2"
    assert "Model 'llama3.2' is not available" in body["detail"]
    fake.models = ["llama3.2:latest"]
    analysis = await client.post(ANALYZE, json={"image_base64": png_base64()}, headers=auth())
    assert analysis.status == 503 and "Model 'llava'" in (await analysis.json())["detail"]


async def test_a_slow_or_failing_server(make_client, base_settings, ollama_url, fake) -> None:
    client = await make_client(with_assistant(base_settings, ollama_url, timeout_s=0.3))
    fake.answer_delay_s = 1.0
    slow = await client.post(CHAT, json={"message": "Hello"}, headers=auth())
    assert slow.status == 503 and (await slow.json())["error"]["details"]["reason"] == "timeout"
    # Tokens that keep coming are no timeout, however long the whole answer takes.
    fake.answer_delay_s, fake.token_delay_s = 0.0, 0.1
    steady = await client.post(CHAT, json={"message": "one two three four five six", "stream": True}, headers=auth())
    assert events(await steady.text())[-1][0] == "done"
    fake.token_delay_s, fake.chat_error = 0.0, (500, "model requires more system memory (5.6 GiB) than is available")
    failed = await client.post(CHAT, json={"message": "Hello"}, headers=auth())
    assert failed.status == 502
    assert "requires more system memory" in (await failed.json())["detail"]


async def test_a_bearer_token_for_an_ollama_behind_a_proxy(make_client, base_settings, ollama_url, fake, tmp_path) -> None:
    fake.token = "proxy-secret"
    refused = await make_client(with_assistant(base_settings, ollama_url))
    response = await refused.post(CHAT, json={"message": "Hello"}, headers=auth())
    assert response.status == 503 and (await response.json())["error"]["details"]["reason"] == "unauthorized"
    (tmp_path / "ollama.key").write_text("proxy-secret\n")
    client = await make_client(with_assistant(base_settings, ollama_url, api_key_file=str(tmp_path / "ollama.key")))
    await chat(client, "Hello")
    assert fake.authorizations[-1] == "Bearer proxy-secret"


async def test_without_an_ollama_url_the_routes_say_how_to_configure_it(make_client, base_settings) -> None:
    client = await make_client(base_settings)
    for method, path, body in (
        ("POST", CHAT, {"message": "Hello"}),
        ("GET", SESSIONS, None),
        ("POST", ANALYZE, {"image_base64": png_base64()}),
        ("POST", ENHANCE, {"prompt": "a fox"}),
    ):
        response = await client.request(method, path, json=body, headers=auth())
        assert response.status == 503, path
        assert "assistant.ollama_url" in (await response.json())["detail"]
    status = await (await client.get("/imagine/status", headers=auth())).json()
    assert "ollama" not in status["models"]
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["assistant"]["configured"] is False and health["status"] == "healthy"


# ---- status, health and metrics -------------------------------------------------------------------------------


async def wait_for_status(client: Any, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(100):
        status = await (await client.get("/imagine/status", headers=auth())).json()
        if condition(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never matched: {status['models']}")


async def test_status_reports_ollama_and_multimodal_from_a_cached_look(make_client, base_settings, ollama_url, fake) -> None:
    fake.models = ["llama3.2:latest"]
    client = await make_client(with_assistant(base_settings, ollama_url, status_ttl_s=60))
    status = await wait_for_status(client, lambda status: status["models"]["ollama"])
    assert status["models"]["multimodal"] is False
    looks = fake.tags_requests
    for _ in range(5):
        await client.get("/imagine/status", headers=auth())
    assert fake.tags_requests == looks  # trusted for status_ttl_s
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["assistant"] == {
        "configured": True, "reachable": True, "chat_model": True, "vision_model": False, "error": "not on the Ollama server: llava"
    }
    assert health["status"] == "healthy"


async def test_metrics_count_chats_tokens_and_ollama_latency(client) -> None:
    await chat(client, "Hello there")
    await (await client.post(CHAT, json={"message": "Hello", "stream": True}, headers=auth())).text()
    text = await (await client.get("/imagine/metrics", headers=auth(scope="metrics"))).text()
    assert 'imagine_assistant_requests_total{outcome="ok",route="chat"} 1.0' in text
    assert 'imagine_assistant_requests_total{outcome="ok",route="chat_stream"} 1.0' in text
    assert 'imagine_assistant_tokens_total{kind="completion"}' in text
    assert 'imagine_ollama_request_seconds_count{call="chat",outcome="ok"} 1.0' in text
