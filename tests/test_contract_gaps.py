"""Where the document and the service used to disagree: each answer is now what /openapi.json says it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagine.security.cloud_api_keys import KeySpec
from imagine.plugin.generators import CloudGenerator, Generator, ModelCard, ModelDefaults, ModelLimits, RemoteImages
from imagine.plugin.hookspecs import hookimpl
from imagine.settings import Settings
from tests.conftest import auth
from tests.slow_plugin import SlowPlugin
from tests.test_jobs import JOBS, job_status, only_events, read_events, submit, wait_for

ADMIN = auth("root", "admin generate")


async def document(client) -> dict[str, Any]:
    return await (await client.get("/imagine/openapi.json")).json()


# ---- POST /jobs: a replay answers what the first request was answered --------------------------


async def test_a_replayed_job_answers_what_accepting_it_answered(make_client, base_settings) -> None:
    client = await make_client(base_settings, plugins=(SlowPlugin(step_seconds=0.01),))
    await submit(client, {"prompt": "ahead", "model": "slow", "steps": 10})
    key = {"Idempotency-Key": "once"}
    body = {"prompt": "behind", "model": "slow", "steps": 11}
    first_response, first = await submit(client, body, **key)
    assert first_response.status == 202 and first["status"] == "queued"

    async def done() -> bool:
        return (await job_status(client, first["id"]))["status"] == "succeeded"

    await wait_for(done)
    again_response, again = await submit(client, body, **key)
    assert again_response.status == 202
    assert again_response.headers["Idempotent-Replayed"] == "true"
    assert again_response.headers["Location"] == first_response.headers["Location"]
    assert again == first  # "queued", as the document's 202 says; the job's state now is at Location
    accepted = (await document(client))["paths"]["/jobs"]["post"]["responses"]["202"]
    assert "Idempotent-Replayed" in accepted["headers"]


# ---- GET /jobs/{id}/events: Last-Event-ID is an event id or nothing ---------------------------


# "50": an id of the right form that this stream never gave.
@pytest.mark.parametrize("value", ["", "abc", "-1", "+1", "1.0", "1234567890", "0x1", "50"])
async def test_a_last_event_id_that_is_no_event_id_is_refused(make_client, base_settings, value) -> None:
    client = await make_client(base_settings, plugins=(SlowPlugin(step_seconds=0.01),))
    _, job = await submit(client, {"prompt": "a", "model": "slow", "steps": 3})
    url = f"{JOBS}/{job['id']}/events"
    refused = await client.get(url, headers={**auth(), "Last-Event-ID": value})
    assert refused.status == 400
    error = (await refused.json())["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"]["errors"][0]["loc"] == ["header", "Last-Event-ID"]
    # An event id still resumes after that event.
    resumed = only_events(await read_events(await client.get(url, headers={**auth(), "Last-Event-ID": "1"})))
    assert int(resumed[0]["id"]) == 2 and resumed[-1]["event"] == "succeeded"


# ---- the bodies' schemas say what the handlers refuse ------------------------------------------


async def test_prompt_schemas_state_the_lengths_the_routes_enforce(client) -> None:
    schemas = (await document(client))["components"]["schemas"]
    for name in ("GenerateBody", "GenerateImageBody", "ImagesGenerationBody"):
        prompt = schemas[name]["properties"]["prompt"]
        assert (prompt["minLength"], prompt["maxLength"]) == (1, 2000), name
    for url in ("/imagine/generate-image", "/imagine/v1/images/generations"):
        assert (await client.post(url, json={"prompt": ""}, headers=auth())).status == 400, url
        assert (await client.post(url, json={"prompt": "x" * 2001}, headers=auth())).status == 400, url


class KeyedCloudGenerator(CloudGenerator):
    """A cloud backend that is never called: only its key service matters here."""

    name = "elsewhere"
    card = ModelCard(
        description="test: a second cloud backend",
        defaults=ModelDefaults(steps=1, guidance=0.0, width=64, height=64, scheduler="none"),
        limits=ModelLimits(min_size=64, max_size=64, max_steps=1),
        vram_required="none",
    )

    def __init__(self, key_file: Path) -> None:
        self.key_spec = KeySpec("elsewhere-api", "ELSEWHERE_API_KEY", key_file)

    async def start(self, session: Any, api_key: Callable[[], str | None]) -> None:
        self._api_key = api_key

    @property
    def configured(self) -> bool:
        return self._api_key() is not None

    async def generate_remote(self, request: Any, started: Any) -> RemoteImages:
        raise AssertionError("never called")

    def problem(self) -> str | None:
        return None

    def catalog(self) -> dict[str, Any]:
        return {}


class KeyedCloudPlugin:
    def __init__(self, key_file: Path) -> None:
        self.generator = KeyedCloudGenerator(key_file)

    @hookimpl
    def register_generators(self, register: Callable[[Generator], None], settings: Settings) -> None:
        register(self.generator)


async def test_api_key_services_are_the_registered_cloud_backends(make_client, base_settings, tmp_path) -> None:
    client = await make_client(base_settings, plugins=(KeyedCloudPlugin(tmp_path / "elsewhere.key"),))
    published = await document(client)
    body = published["paths"]["/api-key"]["post"]["requestBody"]["content"]["application/json"]
    service = published["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]["service"]
    assert service["enum"] == ["elsewhere-api", "leonardo-api"]
    for name, status in (("elsewhere-api", 200), ("nowhere", 400)):
        answer = await client.post("/imagine/api-key", json={"service": name, "api_key": "k" * 20}, headers=ADMIN)
        assert answer.status == status, name


# ---- /gallery/{id}.png: only the PNG route's methods ---------------------------------------------


async def test_the_png_route_allows_only_its_own_methods(make_client, base_settings) -> None:
    client = await make_client(base_settings, plugins=(SlowPlugin(step_seconds=0.0),))
    body = {"prompt": "a", "model": "slow", "steps": 1}
    generated = await client.post("/imagine/generate", json=body, headers=auth())
    png_url = f"/imagine/gallery/{generated.headers['X-Image-Id']}.png"
    for method in ("OPTIONS", "DELETE"):
        response = await client.request(method, png_url, headers=auth())
        assert response.status == 405, method
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}, method
    assert (await client.get(png_url, headers=auth())).status == 200
    # A browser's preflight is told the same methods.
    preflight = await client.options(
        png_url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status == 204
    assert set(preflight.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


# ---- GET /models: where a model not loaded yet will load --------------------------------------------


async def test_models_not_loaded_yet_report_the_configured_device_and_dtype(make_client, base_settings) -> None:
    settings = base_settings.replace(models={"device": "cpu", "dtype": "bfloat16"})
    client = await make_client(settings)
    local = (await (await client.get("/imagine/models", headers=auth())).json())["local_models"]
    assert local
    for name, model in local.items():
        assert (model["loaded"], model["device"], model["dtype"]) == (False, "cpu", "bfloat16"), name


async def test_models_not_loaded_yet_report_the_device_auto_chose(make_client, base_settings) -> None:
    client = await make_client(base_settings, plugins=(SlowPlugin(),))
    # A load runs on the device thread, after it has chosen the device.
    assert (await client.post("/imagine/models/slow/load", headers=ADMIN)).status == 200
    models = await (await client.get("/imagine/models", headers=auth())).json()
    chosen = models["memory"]["device"]
    dtype = "float32" if chosen == "cpu" else "float16"
    waiting = {name: model for name, model in models["local_models"].items() if not model["loaded"]}
    assert "sdxl" in waiting
    for name, model in waiting.items():
        assert (model["device"], model["dtype"]) == (chosen, dtype), name


# ---- messages are the service's own words -----------------------------------------------------------


@pytest.mark.parametrize("url", ["/imagine/generate", "/imagine/jobs", "/imagine/generate-image"])
async def test_a_blank_prompt_is_refused_in_plain_words(client, url) -> None:
    response = await client.post(url, json={"prompt": "  "}, headers=auth())
    assert response.status == 400
    body = await response.json()
    assert body["error"]["details"]["errors"] == [{"loc": ["body", "prompt"], "msg": "must not be blank"}]
    assert body["detail"] == "Invalid request: prompt: must not be blank"


async def test_a_blank_prompt_is_refused_in_plain_words_in_openai_shape(client) -> None:
    response = await client.post("/imagine/v1/images/generations", json={"prompt": "  "}, headers=auth())
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "prompt"
    assert error["message"].endswith("prompt: must not be blank")
