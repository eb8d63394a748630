"""The Redis key names of the shared queue and jobs, in one place so every module agrees on them."""

from __future__ import annotations

import hashlib

PREFIX = "imagine:"
GROUP = "workers"  # the one consumer group every worker reads through

WAITING = PREFIX + "queue:waiting"  # zset: job id -> submission number, for entries no worker has taken
SEQUENCE = PREFIX + "queue:sequence"  # counter behind WAITING's scores
SUBJECTS = PREFIX + "queue:subjects"  # zset: stream -> the turn its subject was last served, for streams with work waiting
SERVED = PREFIX + "queue:served"  # hash: stream -> last turn, kept while the subject has nothing waiting
TURN = PREFIX + "queue:turn"  # counter of batches handed out
STREAMS = PREFIX + "queue:streams"  # set: every stream holding entries, waiting or taken
BELL = PREFIX + "queue:bell"  # list: one push per submission wakes one idle worker
DONE = PREFIX + "queue:done"  # zset: "<job>:<images>" -> finish time, the last minute of throughput
WORKERS = PREFIX + "workers"  # zset: worker name -> the last time it said it was alive
CANCEL_CHANNEL = PREFIX + "cancel"  # pub/sub: job ids to stop wherever they run
# zset: job id -> when what follows its end is next due (its webhook, its quota refund); see imagine.webhooks.outbox
AFTER_END = PREFIX + "jobs:after_end"
# zset: cloud job id -> when the replica running it last said so; see ClusterJobs.watch_cloud_jobs
CLOUD_RUNNING = PREFIX + "jobs:cloud_running"


def _digest(text: str) -> str:
    # Subjects and idempotency keys come from clients: a digest keeps key names short and plain.
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def subject_stream(owner: str) -> str:
    """One stream per subject, so subjects can take turns."""
    return f"{PREFIX}queue:subject:{_digest(owner)}"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def result(job_id: str) -> str:
    """The images of a generation someone waits for (/generate), until that replica reads them."""
    return f"{PREFIX}job:{job_id}:result"


def unfinished(owner: str) -> str:
    return f"{PREFIX}subject:{_digest(owner)}:unfinished"


def finished(owner: str) -> str:
    """zset: the subject's ended listed jobs -> when each ended; SUBMIT forgets the oldest past jobs.max_per_subject."""
    return f"{PREFIX}subject:{_digest(owner)}:finished"


def idempotency(owner: str, key: str) -> str:
    return f"{PREFIX}subject:{_digest(owner)}:idempotency:{_digest(key)}"


def sdapi_model(owner: str) -> str:
    """The model a subject's A1111 client chose (`sd_model_checkpoint`)."""
    return f"{PREFIX}sdapi:model:{_digest(owner)}"
