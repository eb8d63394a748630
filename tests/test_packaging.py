"""What `pip install` (not only an editable checkout) puts on a user's machine."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed() -> None:
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    listed = set(options["options"]["packages"].split())
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "imagine").rglob("__init__.py")
    }
    # An editable install finds a package that is missing here; a wheel would not contain it.
    assert folders <= listed, f"add to setup.cfg [options] packages: {sorted(folders - listed)}"
    assert "imagine_plugins" in listed


def test_the_built_in_plugins_have_an_import_name_of_their_own() -> None:
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    assert options["options"]["package_dir"].split() == ["imagine_plugins", "=", "plugins"]
    import imagine_plugins.sdxl

    assert Path(imagine_plugins.sdxl.__file__).resolve().parent == ROOT / "plugins"
