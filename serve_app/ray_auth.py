"""Ray token authentication for the local Ray clusters this project starts: always on, with a private token.

Ray 2.60 turns token authentication on for a new local cluster (``RAY_AUTH_MODE=token``): every
gRPC call to the cluster's GCS, raylets and workers, and every dashboard request, must carry the
cluster's token.  Ray reads it from ``RAY_AUTH_TOKEN`` (the token itself), else from the file named
by ``RAY_AUTH_TOKEN_PATH``, else from ``~/.ray/auth_token``; ``ray.init()`` starting a new cluster
writes a fresh one to ``~/.ray/auth_token`` when it finds none.  The processes a cluster starts
(GCS, raylet, dashboard agent, workers, so the Serve controller, proxy and replicas) inherit the
environment of the process that started it, so they all read the same token.  Without it anyone
who can reach the cluster's ports can run code on it; the local clusters started here listen on
loopback only (`serve_app.ray_loopback`), but every local user and process can reach loopback:
this project never turns it off (`require_token_mode` refuses any ``RAY_AUTH_MODE`` but ``token``).

Rather than Ray's default file, every run here that starts a local cluster (``python -m
serve_app``, a test session, `loadtest.router_throughput`) uses `private_token`: 256 random bits
(``secrets.token_hex(32)``, like Ray's own generator) in a file only its user can read (0600)
inside a fresh directory only its user can enter (``mkdtemp``: 0700), named by
``RAY_AUTH_TOKEN_PATH`` for this process and everything it starts, removed when the run ends.  Ray's
default file is not used because ``~/.ray/auth_token`` is written with the process's umask (0644
under the usual 022: readable by other local users wherever the home directory can be traversed),
is shared by every local cluster the user ever starts, and outlives them.

``RAY_AUTH_MODE`` itself is left to Ray where it is unset: ``ray.init()`` starting a new local
cluster sets it to ``token`` for this process and its children and makes this process's Ray config
see it.  Setting it here instead would break ``ray.init()`` once ``ray`` is imported: Ray reads its
config at import and does not refresh it for a mode set explicitly, so the driver would call its own
cluster's GCS without the token.  Where it is set (a CI run exports it before anything starts), it
must be ``token``; `require_enabled` checks, once the cluster is up, that Ray did turn it on.

A run whose environment already names a token (``RAY_AUTH_TOKEN``, or ``RAY_AUTH_TOKEN_PATH`` naming a
readable, non-empty file) may keep it (``keep_existing=True``: the launcher does, so a user can run it
with a token of their choosing).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_FILE = "auth_token"


def require_token_mode(env: MutableMapping[str, str] | None = None) -> None:
    """Raise RuntimeError unless ``RAY_AUTH_MODE`` is unset (Ray's default for a local cluster:
    token) or ``token``."""
    env = os.environ if env is None else env
    mode = env.get(MODE)
    if mode is not None and mode != "token":  # exactly: Ray parses this value itself
        raise RuntimeError(f"{MODE}={mode!r}: this project runs Ray only with token authentication "
                           f"(unset {MODE} or set it to 'token'; see serve_app/ray_auth.py)")


def require_enabled(env: MutableMapping[str, str] | None = None) -> None:
    """Raise RuntimeError unless ``RAY_AUTH_MODE`` is ``token`` (after ``ray.init()``: the mode the
    cluster's processes inherited)."""
    env = os.environ if env is None else env
    if env.get(MODE) != "token":
        raise RuntimeError(f"Ray started without token authentication ({MODE}={env.get(MODE)!r})")


def write_token(directory: str | Path) -> Path:
    """A new random token in ``DIRECTORY/auth_token``, created with mode 0600 (never over an
    existing file or through a link); returns its path."""
    path = Path(directory) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def existing_token(env: MutableMapping[str, str] | None = None) -> str | None:
    """Which variable of ``env`` already names a token Ray would use (``RAY_AUTH_TOKEN``, or
    ``RAY_AUTH_TOKEN_PATH`` naming a readable, non-empty file), or None.  Raises RuntimeError for a
    ``RAY_AUTH_TOKEN_PATH`` that names no readable token (Ray would then fall back to
    ``~/.ray/auth_token``, or create it)."""
    env = os.environ if env is None else env
    if env.get(TOKEN, "").strip():
        return TOKEN
    if env.get(TOKEN_PATH):
        try:
            if Path(env[TOKEN_PATH]).read_text().strip():
                return TOKEN_PATH
        except OSError as e:
            raise RuntimeError(f"{TOKEN_PATH}={env[TOKEN_PATH]!r} cannot be read: {e}") from None
        raise RuntimeError(f"{TOKEN_PATH}={env[TOKEN_PATH]!r} is empty")
    return None


@contextlib.contextmanager
def private_token(env: MutableMapping[str, str] | None = None, *, keep_existing: bool = False,
                  prefix: str = "ray-auth-", dir: str | None = None) -> Iterator[Path | None]:
    """While open: ``RAY_AUTH_TOKEN_PATH`` naming a new private token (`write_token` in a fresh
    ``mkdtemp(prefix, dir)``) in ``env`` (default ``os.environ``: this process and what it starts),
    ``RAY_AUTH_TOKEN`` removed.  Yields the token's path, or None where ``keep_existing`` and ``env``
    already names a token (`existing_token`: then nothing is changed).  On exit restores the three
    ``RAY_AUTH_*`` variables (Ray sets the mode) and removes the directory.  Raises RuntimeError for
    a mode other than token (`require_token_mode`)."""
    env = os.environ if env is None else env
    require_token_mode(env)
    saved = {k: env.get(k) for k in (MODE, TOKEN, TOKEN_PATH)}
    directory = None
    try:
        if keep_existing and existing_token(env):
            path = None
        else:
            directory = tempfile.mkdtemp(prefix=prefix, dir=dir)
            path = write_token(directory)
            env.pop(TOKEN, None)
            env[TOKEN_PATH] = str(path)
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
