"""The wheel holds the whole product: every package and subpackage, the Lua scripts and the
console's files.

An editable install (what the tests and ``.ci/run`` use) reads the source tree, so a
subpackage left out of the build would pass every other test and still break
``pip install .`` and the Docker image (``coordinator.transport`` once was). This builds the
wheel the way pip does, without build isolation so it needs no network, and compares it with
the source tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_files() -> set[str]:
    """What the wheel must carry: every module of every package under coordinator/ and
    workers/, and the data files the code reads at run time."""
    want: set[str] = set()
    for top in ("coordinator", "workers"):
        for init in (ROOT / top).rglob("__init__.py"):
            package = init.parent
            want.update(str(p.relative_to(ROOT)) for p in package.glob("*.py"))
    want.update(str(p.relative_to(ROOT)) for p in (ROOT / "coordinator/scripts").glob("*.lua"))
    want.update(str(p.relative_to(ROOT)) for p in (ROOT / "coordinator/webui/static").iterdir()
                if p.is_file())
    want.update({"coordinator/py.typed", "workers/py.typed"})
    return want


def test_the_wheel_holds_every_package_script_and_console_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
        ".ruff_cache", ".pytest_cache", ".hypothesis"))
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = out.glob("alc_coordinator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        held = set(zf.namelist())
    want = source_files()
    assert {"coordinator/transport/client.py", "workers/library/__init__.py",
            "coordinator/webui/static/console.js", "coordinator/scripts/feed.lua"} <= want
    missing = sorted(want - held)
    assert not missing, f"the wheel lacks {missing}"
    assert not [n for n in held if n.startswith("tests/")], "tests are not part of the wheel"
