"""Security: JWT, rate limits and their stores, URL signing, owner-only files, cloud API keys."""
