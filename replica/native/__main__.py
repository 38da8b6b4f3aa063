"""python -m replica.native build|status|clean (see replica.native)."""

from __future__ import annotations

import argparse
import sys

from replica.native import __doc__ as _doc, build, clean, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replica.native", description=(_doc or "").split("\n\n")[0])
    p.add_argument("command", choices=("build", "status", "clean"))
    p.add_argument("--if-stale", action="store_true", help="build: do nothing if the build is current")
    p.add_argument("--verbose", action="store_true", help="build: print mypyc's output")
    a = p.parse_args(argv)
    if a.command == "status":
        ok, why = status()
        print(why)
        return 0 if ok else 1
    if a.command == "clean":
        clean()
        return 0
    if a.if_stale:
        ok, why = status()
        if ok:
            print(f"replica.native: {why}")
            return 0
    try:
        build(verbose=a.verbose)
    except RuntimeError as e:
        print(f"replica.native: build failed: {e}", file=sys.stderr)
        return 1
    print(f"replica.native: {status()[1]}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
