"""GET /metrics: who may scrape, and the counters moving as requests are served."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import auth
from tests.fake_leonardo import API_PREFIX, FakeLeonardo

METRICS = "/imagine/metrics"
SCRAPER = auth("prometheus", "metrics")


def sample(exposition: str, name: str, **labels: str) -> float:
    """One sample's value; 0.0 when the series does not exist (yet)."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


async def scrape(client) -> str:
    response = await client.get(METRICS, headers=SCRAPER)
    assert response.status == 200, await response.text()
    return await response.text()


async def test_scraping_needs_the_metrics_or_admin_scope(client) -> None:
    assert (await client.get(METRICS)).status == 401
    refused = await client.get(METRICS, headers=auth("alice", "generate"))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "FORBIDDEN"
    for scope in ("metrics", "admin"):
        response = await client.get(METRICS, headers=auth("ops", scope))
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")


async def test_counters_move_when_requests_are_served(client) -> None:
    before = await scrape(client)
    assert sample(before, "imagine_queue_capacity") == 32
    assert sample(before, "imagine_queue_depth") == 0
    assert sample(before, "imagine_ratelimit_store_up") == 1  # memory is always there
    generated = await client.post("/imagine/generate", json={"prompt": "a fox", "model": "sdxl-turbo"}, headers=auth())
    assert generated.status == 200
    assert (await client.get("/imagine/jobs/job_not-a-real-one", headers=auth())).status == 404
    assert (await client.get("/imagine/no/such/route")).status == 404

    after = await scrape(client)
    route = {"route": "/imagine/generate", "method": "POST"}
    assert sample(after, "imagine_http_requests_total", **route, status="200") == 1
    assert sample(after, "imagine_http_request_duration_seconds_count", **route) == 1
    # The route's template, never the raw path: one series per route, not per job id.
    jobs = {"route": "/imagine/jobs/{job_id}", "method": "GET", "status": "404"}
    assert sample(after, "imagine_http_requests_total", **jobs) == 1
    assert "job_not-a-real-one" not in after
    assert sample(after, "imagine_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert sample(after, "imagine_http_errors_total", code="NOT_FOUND") == 2
    assert sample(after, "imagine_images_generated_total", model="sdxl-turbo") == 1
    assert sample(after, "imagine_generation_seconds_count", model="sdxl-turbo") == 1
    assert sample(after, "imagine_queue_wait_seconds_count") == 1
    assert sample(after, "imagine_batch_jobs_count") == 1
    assert sample(after, "imagine_model_loads_total", model="sdxl-turbo", outcome="success") == 1
    assert sample(after, "imagine_model_load_seconds_count", model="sdxl-turbo") == 1
    # The scrape before this one was counted too.
    assert sample(after, "imagine_http_requests_total", route=METRICS, method="GET", status="200") == 1


async def test_refusals_are_counted_by_bucket(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(ratelimit={"subject_burst": 2, "subject_rate": 0.001}))
    statuses = [(await client.get("/imagine/models", headers=auth("alice"))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    exposition = await scrape(client)  # another subject: its own bucket
    assert sample(exposition, "imagine_ratelimit_refused_total", bucket="subject") == 1
    assert sample(exposition, "imagine_http_errors_total", code="RATE_LIMIT_EXCEEDED") == 1


async def test_accept_json_gives_seed_000s_summary_and_openmetrics_is_honoured(client) -> None:
    response = await client.get(METRICS, headers={**SCRAPER, "Accept": "application/json"})
    assert response.status == 200
    summary = await response.json()
    assert set(summary) == {"model_loaded", "lora_available", "device", "torch_version", "api_version"}
    assert summary["model_loaded"] is False and summary["device"] == "cpu"
    openmetrics_accept = {**SCRAPER, "Accept": "application/openmetrics-text; version=1.0.0"}
    openmetrics = await client.get(METRICS, headers=openmetrics_accept)
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await openmetrics.text()).rstrip().endswith("# EOF")


async def test_cloud_credits_and_images_are_counted(aiohttp_server, make_client, base_settings, monkeypatch) -> None:
    key = "0f5d2c7e-9721-4e59-9a61-8c1e1f7a3b2d"
    fake = FakeLeonardo(api_key=key)
    server = await aiohttp_server(fake.app())
    monkeypatch.setenv("LEONARDO_API_KEY", key)
    settings = base_settings.replace(
        leonardo={"base_url": str(server.make_url(API_PREFIX)), "poll_interval_s": 0.01, "poll_max_interval_s": 0.02}
    )
    client = await make_client(settings)
    body = {"prompt": "a city", "model": "leonardo", "aspect_ratio": "1:1", "response_format": "json"}
    assert (await client.post("/imagine/generate", json=body, headers=auth())).status == 200
    exposition = await scrape(client)
    assert sample(exposition, "imagine_cloud_credits_spent_total", model="leonardo") == 8  # the fake's apiCreditCost
    assert sample(exposition, "imagine_images_generated_total", model="leonardo") == 1
    assert sample(exposition, "imagine_queue_wait_seconds_count") == 0  # the device queue was never used
