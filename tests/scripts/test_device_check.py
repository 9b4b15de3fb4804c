import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device" / "check.py"


def test_the_device_check_passes_on_the_cpu(capsys):
    # The script the first device call runs: it must keep working, since a GPU minute is dear.
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "device check passed" in out
    assert "trained 12 steps" in out
