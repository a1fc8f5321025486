"""Each package of megatron_save imports first, in a fresh interpreter: no import cycle hidden by test order."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import megatron_save

PACKAGES = sorted(m.name for m in pkgutil.walk_packages(megatron_save.__path__, "megatron_save.") if m.ispkg)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_first(package):
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", f"import {package}"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
