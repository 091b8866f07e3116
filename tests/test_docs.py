"""The README's and the docs' promises, run as written: every python and shell block of README.md and
docs/*.md (blocks marked `<!-- no-test: REASON -->` excepted), the CLI reference generated from the parsers,
and a fast start."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")


def code_blocks(path: Path) -> list[dict]:
    """Every fenced block of a markdown page: language, code, line, and the no-test reason (an HTML comment
    `<!-- no-test: REASON -->` on the line before the fence, blank lines allowed between)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = NO_TEST.search(before)
        blocks.append({"lang": match.group(1).lower(), "code": "\n".join(lines[i + 1 : end]) + "\n", "line": i + 1,
                       "skip": reason.group(1) if reason else None})
        i = end + 1
    return blocks


def runnable(path: Path) -> list[dict]:
    return [b for b in code_blocks(path) if RUN.get(b["lang"]) and not b["skip"]]


def cli_env() -> dict:
    """The environment a user has after activating the venv: its bin/ (with `dymu`) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DYMU_TEST_IMAGES", None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the blocks that run need no network: a Hub access is a bug
    return env


# Runs one page's blocks in order in a fresh interpreter (torch imports once per page): python blocks share
# one namespace, as in a notebook; shell blocks run in bash -euo pipefail. argv: blocks.json, page name.
DRIVER = """
import json, os, subprocess, sys, traceback
blocks, page = json.load(open(sys.argv[1])), sys.argv[2]
namespace = {"__name__": "__main__"}
for block in blocks:
    where = f"{page}:{block['line']}"
    print(f"=== {where} ({block['lang']})", flush=True)
    if block["lang"] in ("python", "py"):
        try:
            exec(compile(block["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"block at {where} failed")
    else:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
        if done.returncode:
            sys.exit(f"block at {where} failed with exit status {done.returncode}")
    sys.stdout.flush()
"""


@pytest.fixture(scope="session")
def docs_folder(tmp_path_factory):
    """What the docs' blocks start from: `dymu demo --save-model tiny-llava` (the demo model and its sample
    images) and `tiny-llava/mid.json` (the quick start's calibrate line), made once."""
    folder = tmp_path_factory.mktemp("docs-start")
    from dymu.families.demos.llava import build_demo_model
    from dymu.tools.demo import save_demo_model

    model, processor = build_demo_model()
    save_demo_model(model, processor, folder / "tiny-llava")
    done = subprocess.run(["dymu", "calibrate", "--model", "tiny-llava", "--images", "tiny-llava/images", "--preset",
                           "mid", "--quiet", "--out", "tiny-llava/mid.json"], cwd=folder, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return folder


def run_page(path: Path, folder: Path) -> subprocess.CompletedProcess:
    blocks = runnable(path)
    (folder / ".blocks.json").write_text(json.dumps(blocks))
    return subprocess.run([sys.executable, "-c", DRIVER, str(folder / ".blocks.json"), path.relative_to(REPO).as_posix()],
                          cwd=folder, env=cli_env(), capture_output=True, text=True, timeout=1200)


PAGES_WITH_BLOCKS = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=[p.relative_to(REPO).as_posix() for p in PAGES_WITH_BLOCKS])
def test_page_blocks_run_as_written(page, docs_folder, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(docs_folder, folder, symlinks=True)
    result = run_page(page, folder)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    if page.name == "quickstart.md":  # what the walkthrough promises to leave behind, read as a user would
        thresholds = json.loads((folder / "tiny-llava" / "mid.json").read_text())
        assert thresholds["images_seen"] >= 6
        tokens = json.loads((folder / "tokens.json").read_text())
        counts = [image["tokens"] for image in tokens["images"]]
        assert len(counts) >= 6 and min(counts) < max(counts) <= tokens["images"][0]["full_tokens"]
        assert (folder / "analysis" / "tokens.csv").exists()
        assert (folder / "analysis" / "complexity_vs_tokens.png").stat().st_size > 1000
        assert "answer" in json.loads((folder / "answer.json").read_text())


def test_every_code_block_runs_or_says_why_not():
    """A python or shell block is either run by the test above or marked with the reason it cannot be
    (the Hub, a GPU, a package install); blocks in other languages are output or syntax, never code to run."""
    for page in PAGES:
        for block in code_blocks(page):
            where = f"{page.relative_to(REPO)}:{block['line']}"
            if block["skip"]:
                assert RUN.get(block["lang"]), f"{where}: no-test on a {block['lang'] or 'plain'} block"
            elif block["lang"] not in RUN:
                assert block["lang"] in ("", "text", "json", "yaml", "toml", "markdown", "csv"), where
    assert any(p.name == "quickstart.md" for p in PAGES_WITH_BLOCKS)


def test_cli_reference_is_current():
    """docs/cli.md is generated from dymu.cli.build_parser(): `python docs/gen_cli.py` rewrites it."""
    done = subprocess.run([sys.executable, str(REPO / "docs" / "gen_cli.py"), "--check"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


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
