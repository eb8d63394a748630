"""The built-in generator plugins, loaded through the same hooks as third-party ones."""
