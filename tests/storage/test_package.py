import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_storage_imports_neither_adapter_core_nor_app():
    """Data flows one way (README): storage must load without the engine or the app."""
    code = ("import sys, storage; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'adapter_core', 'app', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
