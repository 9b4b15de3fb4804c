"""The admin page's adapter figure, and what drawing it costs the app's start-up."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_matplotlib_is_imported_when_an_admin_draws_an_adapter_not_at_start_up():
    """Importing matplotlib took a second of every start (issue 25, point 4): only the figure needs it."""
    script = """
import sys
import app.launch, app.ui
print("at start-up:", "matplotlib" in sys.modules)
from app.admin import LayerSummary
from app.plots import adapter_figure
rows = [LayerSummary(layer, module, 1.0 + layer, 0.5 * layer, (1.0, 0.5, 0.25))
        for module in ("o_proj", "down_proj") for layer in range(3)]
figure = adapter_figure(rows, "user 7")
print("drawn:", "matplotlib" in sys.modules, len(figure.axes), [len(ax.lines) for ax in figure.axes[:2]])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["at start-up: False", "drawn: True 4 [2, 2]"]
