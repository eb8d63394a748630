"""What follows the end of a job: its quota refund and its webhook, wherever the jobs live.

A job is submitted with `after_end` fields (its quota charge, its
`webhook_url` and the origin its image links use). In one process the job
store calls `JobFollowUps.ended` as the job ends: the refund is made then,
and the delivery written to the embedded outbox. With a shared queue the end
itself queues the job in Redis (imagine.cluster.scripts), and every
replica's deliverer follows it up (`imagine.webhooks.outbox.RedisOutbox`),
so it happens even when the replica that ended the job dies right after.

This module also owns the quota store's and the deliverer's lifetimes
(`followups_context`) and the check of a `webhook_url` at submission.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from imagine.errors import field_error, validation_error
from imagine.http.app_keys import jobs_key, metrics_key, settings_key, url_signer_key
from imagine.http.quota_gate import CHARGE_FIELD, quotas_key, refund_due
from imagine.http.urls import gallery_path
from imagine.security.quotas import Charge, Quotas
from imagine.security.tokens import Principal
from imagine.security.url_signing import UrlSigner
from imagine.settings import MAX_URL_TTL_S
from imagine.webhooks.deliverer import Deliverer, keep_for_s, retry_span_s
from imagine.webhooks.outbox import Delivery, RedisOutbox, SqliteOutbox
from imagine.webhooks.signing import Signer, load_secret
from imagine.webhooks.targets import TargetPolicy, TargetRefused

WEBHOOK_FIELD = "webhook_url"
ORIGIN_FIELD = "origin"


def webhook_body(snapshot: Mapping[str, Any], origin: str, signer: UrlSigner, base_path: str, links_from: float) -> str:
    """`{"type", "timestamp", "data"}`: the job's JSON with its images as signed gallery links, not base64,
    each valid for `gallery.url_ttl_s` after `links_from`."""
    data = dict(snapshot)
    result = data.get("result")
    if result is not None:
        links = [
            f"{origin}{gallery_path(base_path, image_id)}?{urllib.parse.urlencode(signer.sign(image_id, links_from))}"
            for image_id in result.get("ids", [])
        ]
        data["result"] = {**result, "images": links}
    finished = data.get("finished_at") or data.get("created_at") or 0
    moment = datetime.datetime.fromtimestamp(float(finished), datetime.UTC)
    return json.dumps(
        {"type": f"job.{data['status']}", "timestamp": moment.isoformat().replace("+00:00", "Z"), "data": data},
        separators=(",", ":"),
    )


class JobFollowUps:
    def __init__(self, app: web.Application, quotas: Quotas, policy: TargetPolicy) -> None:
        self._app = app
        self._quotas = quotas
        self.policy = policy
        self.outbox: SqliteOutbox | None = None
        self.deliverer: Deliverer | None = None

    async def check_target(self, url: Any, store: bool) -> None:
        """400 for a `webhook_url` that may not receive webhooks (checked after DNS), or with `store: false`."""
        if not isinstance(url, str):
            raise validation_error([field_error(WEBHOOK_FIELD, "must be a string")])
        if not store:
            raise validation_error(
                [field_error(WEBHOOK_FIELD, 'needs "store": true: the webhook links to the images in the gallery')]
            )
        try:
            await self.policy.check(url)
        except TargetRefused as refused:
            raise validation_error([field_error(WEBHOOK_FIELD, str(refused))]) from None

    async def settle(self, owner: str, snapshot: dict[str, Any], after_end: Mapping[str, str]) -> None:
        if CHARGE_FIELD in after_end and refund_due(snapshot):
            await self._quotas.refund(Charge.from_json(after_end[CHARGE_FIELD]))

    def prepare(self, owner: str, snapshot: dict[str, Any], after_end: Mapping[str, str]) -> Delivery | None:
        url = after_end.get(WEBHOOK_FIELD)
        if not url:
            return None
        settings = self._app[settings_key]
        # The body is signed once and sent as it is on every attempt: its links must still open for
        # url_ttl_s when the last attempt delivers it, not only when the first does; never, though,
        # for longer in all than the longest url_ttl_s may be.
        span_s = min(retry_span_s(settings.webhooks), MAX_URL_TTL_S - settings.gallery.url_ttl_s)
        links_from = time.time() + span_s
        body = webhook_body(
            snapshot, after_end.get(ORIGIN_FIELD, ""), self._app[url_signer_key], settings.server.base_path, links_from
        )
        # The same id on every attempt: receivers drop the repeats of an at-least-once delivery.
        return Delivery(snapshot["id"], url, f"msg_{snapshot['id']}", body, 0, owner)

    async def ended(self, owner: str, snapshot: dict[str, Any], after_end: Mapping[str, str]) -> None:
        """One process's job store calls this as a job ends."""
        await self.settle(owner, snapshot, after_end)
        delivery = self.prepare(owner, snapshot, after_end)
        if delivery is not None and self.outbox is not None and self.deliverer is not None:
            await self.outbox.add(delivery)
            self.deliverer.wake()


followups_key = web.AppKey("job_followups", JobFollowUps)


@contextlib.asynccontextmanager
async def _quota_store(app: web.Application) -> AsyncIterator[Any]:
    settings = app[settings_key]
    if settings.ratelimit.shared:
        # Counted where the rate-limit buckets are: one count for every replica.
        from imagine.security.redis_quotas import redis_quota_store

        async with redis_quota_store(settings.ratelimit) as store:
            yield store
        return
    from imagine.security.sqlite_quotas import SqliteQuotaStore

    store = SqliteQuotaStore(Path(settings.server.state_dir))
    try:
        yield store
    finally:
        await store.close()


async def followups_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the quota store, the webhook outbox and the deliverer; they close after the jobs."""
    settings = app[settings_key]
    hooks = settings.webhooks
    policy = TargetPolicy(hooks.allowed_hosts)
    signer = Signer(load_secret(hooks)) if policy.enabled else None
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(policy.close)  # after the deliverer, which resolves through it
        store = await stack.enter_async_context(_quota_store(app))
        app[quotas_key] = quotas = Quotas(settings.quotas, store, app[metrics_key])
        stack.push_async_callback(quotas.settle)  # before the store closes
        app[followups_key] = followups = JobFollowUps(app, quotas, policy)
        if settings.queue.shared:
            client = redis.Redis.from_url(settings.queue.storage, socket_connect_timeout=1.0)
            stack.push_async_callback(client.aclose)

            async def snapshot(owner: str, job_id: str) -> dict[str, Any]:
                return await app[jobs_key].snapshot(Principal(sub=owner, scopes=frozenset()), job_id)

            outbox: Any = RedisOutbox(
                client, snapshot=snapshot, settle=followups.settle, prepare=followups.prepare, keep_s=keep_for_s(hooks)
            )
        elif signer is not None:
            outbox = followups.outbox = SqliteOutbox(Path(settings.server.state_dir))
            stack.push_async_callback(outbox.close)
        else:
            outbox = None
        if outbox is not None:
            # With a shared queue it runs even without webhooks: it also settles the quotas of ended jobs.
            deliverer = followups.deliverer = Deliverer(outbox, signer, policy, hooks, app[metrics_key])
            deliverer.start()
            stack.push_async_callback(deliverer.stop)
        yield
