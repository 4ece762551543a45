"""Print the installed packages whose versions differ from a lock file (``make test-latest``).

Usage: python scripts/lock_drift.py requirements/dev.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def locked(path: Path) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of a (uv/pip-tools) lock file."""
    pins = (PIN.match(line) for line in path.read_text().splitlines())
    return {canonicalize_name(pin[1]): pin[2] for pin in pins if pin}


def installed() -> dict[str, str]:
    """``{name: version}`` of every distribution in this environment."""
    return {canonicalize_name(dist.metadata["Name"]): dist.version
            for dist in metadata.distributions() if dist.metadata["Name"]}


def main(lock: str) -> None:
    pins, have = locked(Path(lock)), installed()
    rows = [(name, pins[name], have.get(name, "(not installed)")) for name in sorted(pins)
            if have.get(name) != pins[name]]
    rows += [(name, "(not locked)", have[name]) for name in sorted(set(have) - set(pins))
             if name not in {"insightv-agents", "insightv-research", "pip", "setuptools", "wheel"}]
    if not rows:
        print(f"Every package is at its version in {lock}.")
        return
    print(f"Packages that differ from {lock}:")
    width = max(len(name) for name, _, _ in rows)
    for name, pin, version in rows:
        newer = pin[0].isdigit() and version[0].isdigit() and Version(version) > Version(pin)
        print(f"  {name:<{width}}  {pin:>16} -> {version:<16}{'  newer' if newer else ''}")


if __name__ == "__main__":
    main(*sys.argv[1:])
