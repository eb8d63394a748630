"""Webhooks: a signed POST to the caller's URL when a job ends, delivered at least once.

`signing` signs per the Standard Webhooks specification, `targets` keeps the
service from being turned against its own network (host patterns, addresses
checked after DNS, no redirects), `outbox` holds the pending deliveries where
the jobs live (the embedded database, or Redis with a shared queue), and
`deliverer` sends them with exponential backoff.
"""
