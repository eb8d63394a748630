"""The built-in generator plugins, loaded through the same hooks as third-party ones."""

# Loaded in this order, before the installed plugins.
PLUGINS = (
    "imagine_plugins.sdxl",
    "imagine_plugins.lightning",
    "imagine_plugins.turbo",
    "imagine_plugins.sd15_lora",
    "imagine_plugins.leonardo",
)
