"""External tools the tests drive; a test that needs a missing one skips with the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def require(tool: str, package: str) -> str:
    """Absolute path of a Debian tool, or skip: ``apt-get install {package}``.

    DCMTK tools are looked up in /usr/bin on purpose: pynetdicom installs
    same-named scripts into the virtual environment.
    """
    path = Path("/usr/bin") / tool
    if path.exists():
        return str(path)
    found = shutil.which(tool)
    if found and ".venv" not in found and "site-packages" not in found:
        return found
    pytest.skip(f"{tool} not installed (apt-get install {package})")


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines dciodvfy prints for a file (dicom3tools)."""
    exe = require("dciodvfy", "dicom3tools")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
