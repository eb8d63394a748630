"""GET /openapi.json and /docs: every route documented, and the running service fuzzed against the document."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup

from imagine.http.app import create_app
from imagine.http.server import make_runner
from imagine.devtools.demo_models import demo_settings
from imagine.settings import Settings, load_settings
from tests.conftest import KEYS, make_token
from tests.fake_ollama import FakeOllama
from tests.served import serving


async def test_every_registered_route_is_documented(client) -> None:
    """Routes added later (other modules, plugins) fail here until they declare themselves with @operation."""
    document = await (await client.get("/imagine/openapi.json")).json()
    missing = []
    for route in client.app.router.routes():
        if route.method == "HEAD":  # aiohttp's automatic twin of each GET
            continue
        path = route.resource.canonical.removeprefix("/imagine")
        if route.method.lower() not in document["paths"].get(path, {}):
            missing.append(f"{route.method} {path}")
    assert missing == []
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": "/imagine"}]


async def test_security_and_errors_follow_the_route_annotations(client) -> None:
    document = await (await client.get("/imagine/openapi.json")).json()
    paths = document["paths"]
    for public in (("/livez", "get"), ("/openapi.json", "get"), ("/docs", "get")):
        assert paths[public[0]][public[1]]["security"] == []
    generate = paths["/generate"]["post"]
    assert generate["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "403", "429", "default"} <= set(generate["responses"])
    assert set(generate["responses"]["200"]["content"]) == {"image/png", "application/json"}
    body = document["components"]["schemas"]["GenerateBody"]
    assert {"prompt", "steps", "guidance", "num_inference_steps"} <= set(body["properties"])
    assert "429" not in paths["/livez"]["get"]["responses"]  # never rate limited
    assert "scope admin or metrics" in paths["/metrics"]["get"]["description"]
    ids = [operation["operationId"] for item in paths.values() for operation in item.values()]
    assert len(ids) == len(set(ids))


async def test_docs_work_offline_and_without_a_token(client) -> None:
    page = await client.get("/imagine/docs")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    # Inside <script> HTML entities stay as they are: the URL must be a plain JS string there.
    assert 'url: "/imagine/openapi.json"' in html
    # Nothing is fetched from anywhere but this service.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    for asset in re.findall(r"""(?:src|href)="(/imagine/docs/[^"]+)\"""", html):
        response = await client.get(asset)
        assert response.status == 200, asset
        assert len(await response.read()) > 0
    assert (await client.get("/imagine/docs/..%2Fsettings.py")).status == 404
    assert (await client.get("/imagine/docs/index.html")).status == 404  # only the page's own files


# ---- schemathesis against the live service -----------------------------------------------

# Per operation and per mode (valid, invalid data): enough to cross every field's
# checks, few enough that the whole document is fuzzed in well under a minute.
EXAMPLES_PER_MODE = 15


def fuzz_settings(state: Path, demo_folder: Path) -> Settings:
    """The demo models, held to small sizes and few steps so any valid body generates in a blink."""
    settings = demo_settings(load_settings(None, {"IMAGINE_SERVER_STATE_DIR": str(state)}), demo_folder)
    small = {"min_size": 64, "default_size": 64, "max_size": 128, "max_steps": 4, "default_steps": 2}
    options = {name: {**table, **small} for name, table in settings.models.options.items()}
    return settings.replace(
        models={"options": options},
        ratelimit={"global_burst": 100_000, "ip_burst": 100_000, "subject_burst": 100_000},
        jobs={"max_per_subject": 10_000},
    )


@pytest.fixture(scope="module")
def no_leonardo_key() -> Iterator[None]:
    # The fuzzed service is keyless whatever the environment, so `leonardo` answers the same every run.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LEONARDO_API_KEY", raising=False)
        yield


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path, no_leonardo_key: None) -> Iterator[str]:
    """The app on a real port, on its own loop in a thread: schemathesis calls it synchronously.

    Served by the runner `imagine serve` uses: what aiohttp's parser refuses is answered in the contract's JSON too.
    The assistant's routes answer from a fake Ollama (without one they are all 503).
    """
    settings = fuzz_settings(tmp_path_factory.mktemp("fuzz-state"), demo_folder)
    with serving(FakeOllama().app()) as ollama:
        app = create_app(settings.replace(assistant={"ollama_url": ollama}), keys=KEYS)
        with serving(app, make_runner) as origin:
            yield origin


@pytest.fixture(scope="module")
def api_schema(live_service: str) -> schemathesis.BaseSchema:
    config = SchemathesisConfig.from_dict(
        {
            "base-url": live_service + "/imagine",
            # One token with every scope: the fuzzing is about bodies and parameters, auth has its own tests.
            "auth": {"openapi": {"bearer": {"bearer": make_token("fuzzer", "generate admin metrics")}}},
            "checks": {
                # Valid by the schema is not always valid for the chosen model (sizes and steps differ
                # per model); those answers are 400 by design.
                "positive_data_acceptance": {"enabled": False},
                # Schemathesis's own list, and the refusals of a body, URI or header too large: a query
                # value at its maxLength, percent-encoded, can outgrow the request line (414).
                "negative_data_rejection": {
                    "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 414, 415, 422, 428, 429, 431, "5XX"]
                },
            },
            "request-timeout": 60,
        }
    )
    return schemathesis.openapi.from_url(live_service + "/imagine/openapi.json", config=config)


def test_the_live_service_matches_its_document(api_schema) -> None:
    """Every operation, with valid and invalid data: no 5xx, and every answer as the document says.

    Hypothesis is driven here rather than through schemathesis's pytest plugin, whose
    fixture-based loading does not run under this pytest; the checks are schemathesis's own.
    """
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=EXAMPLES_PER_MODE,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases on every run: a failure here is reproducible
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            def check(case) -> None:
                case.call_and_validate()

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.path  # nothing there to make invalid
            except (Exception, FailureGroup) as failure:  # noqa: BLE001 - every operation gets its turn
                failures[f"{operation.method.upper()} {operation.path} ({mode.value})"] = str(failure)[:2000]
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())
    tested = {f"{operation.method.upper()} {operation.path}" for operation in operations}
    assert {"POST /generate", "POST /jobs", "GET /jobs/{job_id}/events", "GET /metrics", "GET /docs/{asset}"} <= tested


def test_real_results_match_the_document(api_schema) -> None:
    """What random data rarely reaches: JSON results, a job followed to its end, the metrics summary."""
    token = {"Authorization": f"Bearer {make_token('fuzzer', 'generate admin metrics')}"}

    def call(method: str, path: str, **case) -> Any:
        response = api_schema[path][method].Case(**case).call_and_validate(headers=token)
        assert response.status_code < 300, response.text
        return response

    body = {"prompt": "a fox", "model": "sdxl-turbo", "seed": 3}
    call("POST", "/generate", body={**body, "num_images": 2, "response_format": "json"}, media_type="application/json")
    call("POST", "/generate", body=body, media_type="application/json")
    job = call("POST", "/jobs", body={**body, "preview": True}, media_type="application/json").json()
    events = call("GET", "/jobs/{job_id}/events", path_parameters={"job_id": job["id"]})
    assert "event: succeeded" in events.text
    finished = call("GET", "/jobs/{job_id}", path_parameters={"job_id": job["id"]}).json()
    assert finished["status"] == "succeeded" and finished["result"]["seed"] == 3
    call("DELETE", "/jobs/{job_id}", path_parameters={"job_id": job["id"]})
    call("GET", "/metrics", headers={"Accept": "application/json"})
    call("GET", "/info", query={"model": "sdxl-turbo"})
