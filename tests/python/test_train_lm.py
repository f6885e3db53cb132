"""The training example's CPU smoke configuration (examples/train_lm.py --preset cpu-smoke):
all six FFNs and the three ablations train a few dozen steps on the fortunes corpus, and the
validation loss of every one of them must fall (--check)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = os.environ.get("OMNIMOE_CORPUS", "/usr/share/games/fortunes")


def test_cpu_smoke_validation_loss_falls(tmp_path):
    if not Path(CORPUS).exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus {CORPUS} missing: .ci/run installs Debian's fortunes packages")
        pytest.skip(f"corpus {CORPUS} missing (apt-get install fortunes fortunes-min)")
    out = tmp_path / "lm"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_lm.py"), "--preset", "cpu-smoke", "--device",
                        "cpu", "--out", str(out), "--check"], capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 9  # header + six FFNs + three ablations
    assert (out / "curves.csv").exists()
