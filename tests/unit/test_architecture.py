"""The package graph stays acyclic: ``lint-imports`` (import-linter) with the contract in
pyproject.toml, over the source tree as it is (no cache). A cycle it reports names the
dependencies whose removal would break it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not installed: pip install -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([exe, "--no-cache", "--config", str(config)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_import_cycles_between_packages():
    res = lint(ROOT / "src", ROOT / "pyproject.toml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


def test_a_cycle_is_reported(tmp_path):
    """The contract can fail: a two-package cycle in a scratch package is broken."""
    pkg = tmp_path / "cyc"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from ..b import x\n")
    (pkg / "b" / "__init__.py").write_text("x = 1\n\ndef f():\n    from ..a import y  # a lazy import counts\n")
    cfg = tmp_path / "pyproject.toml"
    contract = (ROOT / "pyproject.toml").read_text().split("[tool.importlinter]")[1].split("[tool.pytest")[0]
    cfg.write_text("[tool.importlinter]" + contract.replace('"clickpulse"', '"cyc"').replace('["clickpulse"]', '["cyc"]'))
    res = lint(tmp_path, cfg)
    assert res.returncode != 0 and "0 kept, 1 broken" in res.stdout, res.stdout[-2000:]
    assert ".a -> .b" in res.stdout or ".b -> .a" in res.stdout, res.stdout[-2000:]
