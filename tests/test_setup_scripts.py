"""The two commands' set-up: what a fresh machine needs is installed, and the wait is explained."""

from __future__ import annotations

import re
from pathlib import Path

from tests.processes import PACKAGES

ROOT = Path(__file__).resolve().parent.parent


def test_ci_installs_every_program_the_tests_run() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    tests = "\n".join(path.read_text() for path in (ROOT / "tests").glob("*.py"))
    started = set(re.findall(r'program\("([a-z-]+)"', tests))
    if re.search(r'\["curl"|"curl",|shlex\.split\(curl_line\)', tests):
        started.add("curl")
    assert {"nginx", "redis-server", "curl"} <= started
    for name in started:
        package = PACKAGES.get(name, name)
        assert re.search(rf"missing\+=\({re.escape(package)}\)", script), f".ci/run does not install {package}"
    # Debian's own python3 makes no virtualenv without it.
    assert "missing+=(python3-venv)" in script


def test_the_first_make_says_what_it_installs_and_how_long_it_takes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile[makefile.index("$(VENV)/.installed:"):]
    steps = [line.strip() for line in rule.splitlines()[1:] if line.startswith("\t")]
    installs = [index for index, step in enumerate(steps) if "pip install" in step and "--upgrade pip" not in step]
    assert installs
    assert re.search(r"about \d+ minutes", steps[0])
    for index in installs:
        assert steps[index - 1].startswith("@echo"), f"nothing is said before: {steps[index]}"
