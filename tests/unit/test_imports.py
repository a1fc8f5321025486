"""Each package of megatron_save imports first, as if in a fresh interpreter: no import cycle hidden by test
order. One child interpreter imports torch, Megatron and transformers once, then each package with every
megatron_save module forgotten before it (cycles can only run through our own modules)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import megatron_save

PACKAGES = sorted(m.name for m in pkgutil.walk_packages(megatron_save.__path__, "megatron_save.") if m.ispkg)

_CHILD = """
import importlib, json, sys, traceback
import megatron.core, torch, transformers  # third-party imports, kept between packages
failures = {}
for package in json.loads(sys.argv[1]):
    for name in [m for m in sys.modules if m == "megatron_save" or m.startswith("megatron_save.")]:
        del sys.modules[name]
    try:
        importlib.import_module(package)
    except Exception:
        failures[package] = traceback.format_exc()
print(json.dumps(failures))
"""


def test_every_package_imports_first():
    assert len(PACKAGES) >= 10, PACKAGES
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD, json.dumps(PACKAGES)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{package}:\n{error}" for package, error in failures.items())
