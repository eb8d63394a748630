"""HTTP handlers, one module per resource; each module's `routes(base)` lists its routes."""
