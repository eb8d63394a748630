"""The plugin interface: what a plugin author imports."""
