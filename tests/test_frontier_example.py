"""examples/sentiment_frontier end to end on the real stories260K, shortened: two betas, two checkpoints each."""

import pytest
import json
import subprocess
import sys
from pathlib import Path

from tiny import shared_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_frontier_example_runs_and_smaller_beta_moves_further(tmp_path):
    model = shared_path("models/stories260K")  # skips with a reason when ../shared is absent
    out = tmp_path / "frontier"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples/sentiment_frontier/run.py"), "--model", str(model), "--out", str(out),
         "--betas", "0.05", "0.5", "--checkpoints", "2", "--eval-prompts", "8", "--epochs", "2", "--max-new-tokens",
         "24"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frontier = json.loads((out / "frontier.json").read_text())
    small, large = frontier["curves"]["0.05"], frontier["curves"]["0.5"]
    assert len(small) == len(large) == 3 and small[0]["kl"] == 0.0  # the reference, then two checkpoints
    for end in (small[-1], large[-1]):
        assert end["reward"] > frontier["reference_reward"] and end["kl"] > 0 and end["win_rate"] > 0.5
    assert small[-1]["kl"] > large[-1]["kl"]  # a smaller beta lets the policy move further from the reference
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "runs" / "summary.md").exists()
