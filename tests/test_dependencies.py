"""The package metadata states ranges (a cluster's own CUDA torch is kept by ``pip install -e .``), and
constraints.txt, which ``make setup`` installs with, pins one tested version inside every range."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = ("test", "export")  # what make setup and CI install, and the export command's extra


def _requirements() -> list[Requirement]:
    lines = PROJECT["dependencies"] + [r for extra in EXTRAS for r in PROJECT["optional-dependencies"][extra]]
    return [Requirement(line) for line in lines]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_metadata_states_ranges_not_exact_pins():
    exact = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"pyproject.toml pins exactly (pins belong in constraints.txt): {exact}"


def test_torch_range_keeps_the_versions_known_to_run():
    torch = next(r for r in _requirements() if r.name == "torch")
    assert torch.specifier.contains("2.11.0") and torch.specifier.contains(str(_pins()["torch"]))


def test_constraints_pin_every_requirement_inside_its_range():
    pins = _pins()
    unpinned = [r.name for r in _requirements() if canonicalize_name(r.name) not in pins]
    outside = [f"{r} (pinned {pins[canonicalize_name(r.name)]})" for r in _requirements()
               if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not unpinned and not outside, f"constraints.txt: unpinned {unpinned}, outside the range {outside}"
    assert canonicalize_name(PROJECT["name"]) not in pins, "constraints.txt must not pin the project itself"


def test_make_setup_installs_with_the_constraints_and_rebuilds_when_they_change():
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^STAMP := (.+)$", makefile, re.M)
    assert stamp and "constraints.txt" in stamp.group(1)
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b", makefile, re.M)
    assert re.search(r"pip install .*-c constraints\.txt", makefile)
