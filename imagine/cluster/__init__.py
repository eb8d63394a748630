"""One service across replicas: the queue, jobs and their events in Redis, shared by every replica.

With `queue.storage = "redis://..."` a generation becomes an entry of a Redis
stream (one per subject, read through one consumer group) and a job record
with its own event stream. Each replica's device thread pulls entries only
when it is free, so the next job runs on whichever GPU is idle, wherever it
was submitted; a worker that dies leaves its entries pending, and another
claims them after `queue.visibility_timeout_s`. Everything distributed is
Redis's own (streams, consumer groups, scripts, pub/sub): no protocol of ours
between replicas.
"""
