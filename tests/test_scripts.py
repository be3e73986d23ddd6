"""Every benchmark and tool script under scripts/ still starts: a moved import shows here, not on the day it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# liveclients.py is a module the others import, not a command.
SCRIPTS = [p for p in sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
           if '__name__ == "__main__"' in p.read_text()]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_starts_and_prints_its_help(script, tmp_path):
    # From another folder: a script must find the package and the test helpers itself.
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
