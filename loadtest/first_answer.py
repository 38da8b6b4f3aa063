"""Time from the README's run command to the first answered request.

  python -m loadtest.first_answer [--timeout 300] [-- EXTRA build_app ARGS]

Starts `bash .ci/start` (set-up, then `python -m serve_app` on 127.0.0.1:8000), sends the README's curl
request every 0.5 s until one is answered, prints the elapsed time and the answer as JSON, then
stops the server it started (SIGTERM to that process group) and waits for it to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000/v1/completions"
BODY = {"model": "mistral-7b-sim", "prompt": "Hello, how are you?", "max_tokens": 16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.first_answer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("extra", nargs="*", help="build_app arguments passed to .ci/start")
    a = ap.parse_args(argv)
    env = {**os.environ, "TIERED_API_KEYS": "dev-premium-key:premium,dev-free-key:free"}
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", ".ci/start", *a.extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    answer = None
    try:
        with httpx.Client(timeout=10.0) as client:
            while time.monotonic() - t0 < a.timeout and proc.poll() is None:
                try:
                    r = client.post(URL, json=BODY, headers={"Authorization": "Bearer dev-premium-key"})
                    if r.status_code == 200 and r.json().get("choices"):
                        answer = r.json()
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        elapsed_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(json.dumps({"first_answer_s": round(elapsed_s, 1) if answer else None, "answer": answer}, indent=1))
    return 0 if answer else 1


if __name__ == "__main__":
    sys.exit(main())
