"""`python -m loadtest.calibrate`: the shipped profiles are what the data gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from loadtest.calibrate import chunked_prompt, fit_vidur
from replica.cost.profile import PROFILES_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_calibrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.calibrate", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_passes_on_shipped_profiles() -> None:
    result = run_calibrate("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match a fresh calibration" in result.stdout
    for name in ("a100-mistral7b", "h100-mistral7b", "rtx6000ada-mistral7b", "h100-mistral7b-measured"):
        assert name in result.stdout


def test_check_fails_on_drift(tmp_path: Path) -> None:
    for path in PROFILES_DIR.glob("*.json"):
        shutil.copy(path, tmp_path)
    edited = tmp_path / "h100-mistral7b.json"
    data = json.loads(edited.read_text())
    data["coefficients"]["per_token_ms"] *= 1.01
    edited.write_text(json.dumps(data))
    result = run_calibrate("--check", "--profiles-dir", str(tmp_path))
    assert result.returncode != 0
    assert "h100-mistral7b.json" in result.stderr and "per_token_ms" in result.stderr


def test_regenerating_writes_the_shipped_files(tmp_path: Path) -> None:
    result = run_calibrate("--profiles-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in PROFILES_DIR.glob("*.json"))
    assert run_calibrate("--check", "--profiles-dir", str(tmp_path)).returncode == 0


def test_chunking_of_a_prompt() -> None:
    chunks = chunked_prompt(2048, 384)
    assert [(c.num_prefill_tokens, c.sum_prefill_ctx // max(c.num_prefill_tokens, 1)) for c in chunks] == [
        (384, 0), (384, 384), (384, 768), (384, 1152), (384, 1536), (128, 1920)
    ]
    assert len(chunked_prompt(2048, 512)) == 4


def test_a100_fit_matches_published_form() -> None:
    # The project's shared data PROVENANCE.md quotes this fit of the same table (5 % mean error).
    published = [8.35, 0.0690, 1.10e-5, 3.47e-6, 8.95e-5]
    for fitted, quoted in zip(fit_vidur("a100"), published):
        assert abs(fitted / quoted - 1.0) < 0.01
