"""The engine: the device executor, queue and batching, model registry and memory, generation, jobs."""
