"""Storage: the gallery."""
