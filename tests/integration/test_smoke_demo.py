"""The README's main job runs and its loss falls (short version)."""

import re
import subprocess
import sys


def test_demo_loss_falls():
    out = subprocess.run([sys.executable, "-m", "qgalore_dist.train.demo", "--steps", "40"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) >= 3, out
    assert losses[-1] < 0.8 * losses[0], out
