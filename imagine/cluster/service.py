"""The shared queue's parts for one replica's lifetime: the Redis client, the job store, the worker, the cancel channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from imagine.cluster import keys
from imagine.cluster.jobs import ClusterJobs
from imagine.cluster.queue import SharedQueue
from imagine.cluster.records import JobRecords
from imagine.cluster.worker import ClusterWorker, Finisher
from imagine.engine.executor import DeviceExecutor
from imagine.engine.jobs import JobRunner, ResultJson
from imagine.engine.registry import ModelRegistry
from imagine.settings import Settings

log = logging.getLogger(__name__)

# A connection attempt to an unreachable Redis fails this fast, so a request answers 503 promptly.
CONNECT_TIMEOUT_S = 1.0


@dataclass
class Cluster:
    """What the rest of the app uses of the shared queue."""

    jobs: ClusterJobs
    queue: SharedQueue
    worker: ClusterWorker
    client: redis.Redis  # for what else every replica must agree on (the A1111 routes' model choices)


async def _listen_for_cancels(client: redis.Redis, targets: list[Callable[[str], None]]) -> None:
    """Stop cancelled jobs that run here; resubscribes after a Redis restart."""
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(keys.CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        job_id = message["data"].decode()
                        for stop in targets:
                            stop(job_id)
        except RedisError as error:
            log.debug("the cancel channel dropped (%s); subscribing again", error)
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def shared_queue(
    settings: Settings,
    executor: DeviceExecutor,
    registry: ModelRegistry,
    *,
    device: bool,
    run_here: JobRunner,
    finish: Finisher,
    to_json: ResultJson,
) -> AsyncIterator[Cluster]:
    """`queue.storage`'s Redis for as long as the app runs; with `device`, this replica's device pulls from it."""
    client = redis.Redis.from_url(
        settings.queue.storage,
        # Blocking reads wait longer than any socket timeout would allow; a dead
        # server is noticed by the connection, an unreachable one by the connect timeout.
        socket_timeout=None,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        # One immediate retry replaces a pooled connection that Redis closed (a restart).
        retry=Retry(NoBackoff(), 1),
    )
    queue = SharedQueue(
        client, visibility_timeout_s=settings.queue.visibility_timeout_s, max_attempts=settings.queue.max_attempts
    )
    records = JobRecords(client, ttl_s=settings.jobs.ttl_s)
    jobs = ClusterJobs(
        client,
        queue,
        records,
        capacity=settings.queue.max_size,
        timeout_s=settings.queue.timeout_s,
        max_per_subject=settings.jobs.max_per_subject,
        keepalive_s=settings.jobs.keepalive_s,
        visibility_timeout_s=settings.queue.visibility_timeout_s,
        local_seconds_per_image=lambda: executor.seconds_per_item,
        run_here=run_here,
        to_json=to_json,
    )
    worker = ClusterWorker(
        queue,
        records,
        executor,
        registry,
        device=device,
        max_images=settings.batch.max_size,
        visibility_timeout_s=settings.queue.visibility_timeout_s,
        finish=finish,
        to_json=to_json,
    )
    listener = asyncio.create_task(_listen_for_cancels(client, [worker.stop_job, jobs.stop_here]), name="imagine-cancels")
    watcher = asyncio.create_task(jobs.watch_cloud_jobs(), name="imagine-cloud-jobs")
    worker.start()
    try:
        yield Cluster(jobs=jobs, queue=queue, worker=worker, client=client)
    finally:
        await worker.stop()
        for task in (listener, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()
