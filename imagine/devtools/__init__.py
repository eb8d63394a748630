"""Developer tools, apart from the service: bench, demo and full-size models."""
