"""Importing the router must stay light: no chat engine, no web framework, no training libraries."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = ("import sys, ktulhu.router, ktulhu.prompts, ktulhu.router.cli; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('llama_cpp', 'quart', 'quart_trio', 'hypercorn', 'torch', 'onnx', 'onnxruntime')]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
