"""Compiled builds of the hot pure-Python modules (mypyc), used only while they match the sources.

The scheduling policies, the simulated engine and the simulator's token log run once per engine
iteration for every request in the batch; in CPython that loop is what the virtual-time sweeps
and the vLLM adapter's step overhead are made of.  mypyc compiles these same source files, as
they are, to C extensions (the policies stay the code the vLLM adapter runs; nothing is
rewritten), about twice as fast.

    python -m replica.native build     compile MODULES into replica/_native/ (gitignored)
    python -m replica.native status    whether the build is in use, and why not
    python -m replica.native clean     remove it

`install()` (run by ``import replica``) puts a finder in front of the import system that loads
the compiled modules, all of them or none: only when the build was made from exactly the current
sources (a hash of them in the build's manifest), by this Python, and ``REPLICA_NATIVE`` is not
``0``.  Otherwise every module is imported from its source, as without a build; a stale build is
reported once (a `RuntimeWarning`) and never loaded, so editing a source can never run old code.
The compiled and the source modules give the same results to the last bit (float arithmetic is
the same IEEE double arithmetic; `tests/replica/test_native.py` compares simulations of both).

The build needs mypy (the ``native`` extra, installed by ``.ci/setup``) and a C compiler; without
them everything runs from source, slower.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

# The modules compiled together (one mypyc group: they call each other's classes natively).
# Only pure-Python modules with no vllm or ray import; a module that subclasses one of their
# classes from outside needs it marked `mypyc_attr(allow_interpreted_subclasses=True)`.
MODULES = (
    "replica.policy.state",
    "replica.policy.plan",
    "replica.policy.base",
    "replica.policy.slai",
    "replica.policy.slai_plus",
    "replica.policy.slai_next",
    "replica.policy.sarathi",
    "replica.policy.vllm_style",
    "replica.policy.rad",
    "replica.sim.prefix_cache",
    "replica.sim.engine",
    "loadtest.simulate.replica",
)
GROUP = "replica_native"  # the shared library: replica_native__mypyc
ROOT = Path(__file__).resolve().parent.parent.parent  # where the `replica` and `loadtest` packages live
NATIVE_DIR = Path(__file__).resolve().parent.parent / "_native"
MANIFEST = NATIVE_DIR / "manifest.json"
ENV = "REPLICA_NATIVE"  # "0": import every module from its source


def source_path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def sources_digest() -> str:
    """A hash of the compiled modules' sources (names and bytes)."""
    h = hashlib.sha256()
    for m in MODULES:
        h.update(m.encode() + b"\0" + source_path(m).read_bytes() + b"\0")
    return h.hexdigest()


def _abi() -> str:
    return f"{sys.implementation.cache_tag}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def status() -> tuple[bool, str]:
    """Whether the compiled modules can be used now, and why (not)."""
    return _check()[:2]


def _check() -> tuple[bool, str, dict[str, str]]:
    """`status`, and the build's files (module name -> path under NATIVE_DIR) when it is usable."""
    if os.environ.get(ENV) == "0":
        return False, f"{ENV}=0", {}
    try:
        manifest = json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        return False, "not built (python -m replica.native build)", {}
    except (OSError, ValueError) as e:
        return False, f"unreadable manifest {MANIFEST}: {e}", {}
    if manifest.get("abi") != _abi():
        return False, f"built for {manifest.get('abi')}, this Python is {_abi()}: rebuild", {}
    try:
        digest = sources_digest()
    except OSError as e:  # (an install without one of MODULES' packages)
        return False, f"sources unreadable: {e}", {}
    if manifest.get("sources") != digest:
        return False, "stale: the sources changed since the build (python -m replica.native build)", {}
    files = manifest.get("files", {})
    missing = [name for name in (*MODULES, f"{GROUP}__mypyc") if not (NATIVE_DIR / files.get(name, "?")).is_file()]
    if missing:
        return False, f"incomplete build (no {missing[0]}): rebuild", {}
    return True, f"compiled ({len(MODULES)} modules, {NATIVE_DIR})", files


class _NativeFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules (and their shared library) in the build directory."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        file = self.files.get(name)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(name, str(file))
        return importlib.util.spec_from_file_location(name, file, loader=loader)


_installed: _NativeFinder | None = None


def install() -> bool:
    """Load the compiled modules from now on, if the build is current (see the module docstring).
    Returns whether it does.  Call it before any of MODULES is imported (``import replica`` does)."""
    global _installed
    if _installed is not None:
        return True
    ok, why, files = _check()
    if not ok:
        # (not said to `python -m replica.native`, which is there to fix it)
        if why.startswith(("stale", "built for", "incomplete", "unreadable")) and \
                sys.orig_argv[1:3] != ["-m", "replica.native"]:
            warnings.warn(f"replica.native: {why}; running the Python sources", RuntimeWarning, stacklevel=2)
        return False
    if any(m in sys.modules for m in MODULES):  # some already run from source: all or none
        warnings.warn("replica.native: installed after some of its modules were imported from source; "
                      "running the Python sources", RuntimeWarning, stacklevel=2)
        return False
    _installed = _NativeFinder({name: NATIVE_DIR / rel for name, rel in files.items()})
    sys.meta_path.insert(0, _installed)
    return True


def in_use() -> bool:
    """Whether this process imports the compiled modules."""
    return _installed is not None


def build(verbose: bool = False) -> Path:
    """Compile MODULES with mypyc into NATIVE_DIR and write the manifest.  Raises RuntimeError
    with the compiler's output if it fails (the old build, if any, is removed first)."""
    try:
        import mypyc  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the native build needs mypy (pip install -e '.[native]')") from e
    clean()
    digest = sources_digest()
    with tempfile.TemporaryDirectory(prefix="replica-native-") as tmp:
        script = (
            "import sys\n"
            "from setuptools import setup\n"
            "from mypyc.build import mypycify\n"
            f"setup(name={GROUP!r}, script_args=['build_ext', '--build-lib', {tmp + '/lib'!r}, '--build-temp', "
            f"{tmp + '/temp'!r}], ext_modules=mypycify({[str(source_path(m).relative_to(ROOT)) for m in MODULES]!r}"
            f" + ['--ignore-missing-imports', '--follow-imports=silent'], group_name={GROUP!r}, opt_level='3', target_dir={tmp + '/c'!r}))\n"
        )
        env = {**os.environ, "MYPY_CACHE_DIR": f"{tmp}/mypy_cache", ENV: "0"}
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
        if verbose or proc.returncode:
            print(proc.stdout[-20_000:], proc.stderr[-20_000:], sep="\n", file=sys.stderr)
        if proc.returncode:
            raise RuntimeError(f"mypyc failed (exit {proc.returncode}); its output is above")
        lib = Path(tmp) / "lib"
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        files: dict[str, str] = {}
        for name in (*MODULES, f"{GROUP}__mypyc"):
            rel = Path(*name.split(".")).with_suffix(suffix)
            built = lib / rel
            if not built.is_file():
                raise RuntimeError(f"mypyc built no {rel} (found: {sorted(str(p.relative_to(lib)) for p in lib.rglob('*.so'))})")
            (NATIVE_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, NATIVE_DIR / rel)
            files[name] = str(rel)
    if sources_digest() != digest:
        clean()
        raise RuntimeError("the sources changed during the build; build again")
    MANIFEST.write_text(json.dumps({"abi": _abi(), "sources": digest, "files": files,
                                    "platform": sysconfig.get_platform()}, indent=1) + "\n")
    return NATIVE_DIR


def clean() -> None:
    if NATIVE_DIR.exists():
        shutil.rmtree(NATIVE_DIR)
