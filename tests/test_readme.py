"""The README is what a newcomer reads first: its commands and its config reference must be true."""

from __future__ import annotations

import re

from conftest import ROOT
from rl.config import reference


def test_readme_config_reference_is_current():
    """Every field line `python -m rl.config` prints appears verbatim in the README."""
    readme = (ROOT / "README.md").read_text()
    missing = [line for line in reference() if line not in readme]
    assert not missing, f"README config reference is stale; regenerate with python -m rl.config: {missing[:3]}"


def test_readme_starts_with_the_two_setup_commands():
    """First the demo command, then the test command that .ci/run executes."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()[:6] if line.startswith("    ")]
    assert len(lines) == 2
    demo, tests = lines
    found = re.search(r"python -m rl\.sweep (configs/\S+\.yaml)$", demo)
    assert "pip install" in demo and found, demo
    assert (ROOT / found.group(1)).is_file()
    assert "pip install" in tests and "pytest" in tests
    assert "torchvision" not in demo + tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "pytest" in ci
