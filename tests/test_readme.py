"""The README's promises, run as written: the offline walkthrough's shell blocks, and a fast start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WALKTHROUGH = "## Try it offline"


def walkthrough_blocks(readme: str) -> list[str]:
    """The ```bash blocks of the README's walkthrough section (up to the next level-2 heading)."""
    start = readme.index(WALKTHROUGH)
    end = readme.find("\n## ", start + len(WALKTHROUGH))
    section = readme[start : end if end != -1 else len(readme)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def cli_env() -> dict:
    """The environment a user has after activating the venv: its bin/ (with `dymu`) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DYMU_TEST_IMAGES", None)
    return env


def test_walkthrough_runs_as_written(tmp_path):
    blocks = walkthrough_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2, "the walkthrough section lost its shell blocks"
    for block in blocks:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=cli_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block failed:\n{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    # What the blocks promise to leave behind, read as a user would.
    assert (tmp_path / "tiny-llava" / "config.json").exists()
    assert len(list((tmp_path / "tiny-llava" / "images").glob("*.jpg"))) >= 2
    thresholds = json.loads((tmp_path / "tiny-llava" / "mid.json").read_text())
    assert thresholds["images_seen"] >= 6
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    counts = [image["tokens"] for image in tokens["images"]]
    assert len(counts) >= 6 and min(counts) < max(counts) <= tokens["images"][0]["full_tokens"]
    assert (tmp_path / "analysis" / "tokens.csv").exists()
    assert (tmp_path / "analysis" / "complexity_vs_tokens.png").stat().st_size > 1000


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_cli_starts_fast(flag):
    """`dymu --version` / `--help` load no torch: well under a second here (bound kept loose for CI)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dymu.cli", flag], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 3.0, f"dymu {flag} took {elapsed:.2f} s"


def test_import_dymu_is_lazy():
    code = ("import sys, dymu; assert 'torch' not in sys.modules, 'import dymu loaded torch'; "
            "f = dymu.calibrate; assert callable(f) and f.__module__ == 'dymu.tools.calibration'; "
            "assert 'torch' in sys.modules; import dymu.merge; print(dymu.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
