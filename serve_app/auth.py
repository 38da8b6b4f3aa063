"""API keys -> tiers.  The key store holds only SHA-256 hashes of keys.

Keys come from the sources the config names (`serve_app.config.ApiKeysConfig`):

- ``api_keys.env``: an environment variable holding ``KEY:TIER,KEY:TIER`` (for local testing,
  e.g. ``export TIERED_API_KEYS='dev-premium-key:premium,dev-free-key:free'``);
- ``api_keys.file``: a secret file (e.g. a mounted Kubernetes Secret), one ``KEY TIER`` or
  ``KEY:TIER`` per line, ``#`` starts a comment;
- ``api_keys.hashes``: ``{sha256-hex: tier}`` in the config itself.

Wherever a key is expected, ``sha256:<64 hex digits>`` may stand instead: the hash of the key, as
printed by ``python -m serve_app.auth hash KEY`` (or ``... hash -`` reading keys from stdin, which
keeps them out of the shell history), so secret files need not hold plaintext either.

The key file is re-read without a restart: `KeyStore.tier_for` checks the file's modification
time (``os.stat``: mtime, size, inode) at most every `RELOAD_CHECK_S` seconds, on the request path,
and when it changed, re-reads it and swaps the new keys in (the other sources' keys stay).  A file
that no longer reads, parses or validates (or leaves no key at all) changes nothing: the old keys
stay and a warning names the file and the line (never a key); the next change is tried again.

A key given in plaintext (``api_keys.env``, ``api_keys.file``) must be at least `MIN_KEY_LENGTH`
(12) characters long, else `KeyConfigError` naming the source and the entry or line.  A hashed
entry (``sha256:...`` or ``api_keys.hashes``) cannot be checked, since its length is not in its
digest: ``python -m serve_app.auth hash`` refuses short keys instead, so hash only keys it accepted.

A key is a Bearer token (RFC 6750 ``b64token``: letters, digits and ``-._~+/``, then ``=``
padding).  `KeyStore.tier_for` parses ``Authorization: Bearer KEY`` strictly (scheme
case-insensitive), hashes the key, looks its SHA-256 digest up in a dict (digest -> tier) and
confirms the entry it found with one `hmac.compare_digest` of the two digests (a miss is compared
with a fixed dummy digest of the same length): one lookup and one comparison whatever the number of
keys, so a store of 10,000 keys answers as fast as one of 2.  Failures are `AuthError` (401,
OpenAI error code ``invalid_api_key``), whose messages never contain the key.

Why a dict lookup does not open a timing side channel: what the lookup hashes and compares (with
``==``, which may stop at the first differing character) is the SHA-256 digest of the presented
key, never the key.  An attacker chooses keys, not digests: steering a digest towards a chosen
stored digest, even one hex digit at a time, is a SHA-256 preimage search (16**k tries for the
first k digits), and learning a stored digest, even whole, does not give its key (keys are long
random tokens: the digest's preimage is out of reach).  So the time of a lookup reveals nothing
that helps forge a key; the `hmac.compare_digest` afterwards makes the final match itself
constant-time.  Unsalted SHA-256 is sound here for the same reason: API keys are long random
tokens, not passwords.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.config import AppConfig

__all__ = ["MIN_KEY_LENGTH", "RELOAD_CHECK_S", "AuthError", "KeyConfigError", "KeyStore", "hash_key",
           "hashed_env_keys", "is_valid_key"]

logger = logging.getLogger(__name__)

RELOAD_CHECK_S = 5.0  # at most one os.stat of api_keys.file per this many seconds (on the request path)

HASH_PREFIX = "sha256:"
MIN_KEY_LENGTH = 12  # characters of a plaintext key (the dev keys dev-free-key, dev-premium-key: 12, 15)
_TOO_SHORT = f"the key is shorter than {MIN_KEY_LENGTH} characters (use long random keys, e.g. 32+)"
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AUTH_HEADER = re.compile(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*) +(\S+)")
_OWS = " \t"


class AuthError(Exception):
    """A request that is not authenticated.  ``status_code``/``code``/``type`` follow OpenAI's
    error format (`to_openai()`); the message never contains the presented key."""

    def __init__(self, message: str, *, status_code: int = 401, code: str = "invalid_api_key",
                 type: str = "invalid_request_error") -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.type = type

    @property
    def headers(self) -> dict[str, str]:
        """Response headers for the error (RFC 6750 challenge on 401)."""
        return {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else {}

    def to_openai(self) -> dict[str, Any]:
        """The response body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}


class KeyConfigError(ValueError):
    """A key source is unusable (unset, unreadable, malformed line, unknown tier, conflicting
    entries).  Messages name the source and the line or entry number, never a key."""


KEY_ID_HEX_DIGITS = 12


def key_id(digest: str) -> str:
    """A key's id: the first 12 hex digits of its SHA-256 (48 bits: names a key among a deployment's
    keys, reveals nothing usable about it)."""
    return digest[:KEY_ID_HEX_DIGITS]


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a key (UTF-8)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_valid_key(key: str) -> bool:
    """Whether ``key`` can be sent as a Bearer token (RFC 6750 b64token)."""
    return _TOKEN68.fullmatch(key) is not None


_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_MALFORMED = "Malformed Authorization header: expected 'Authorization: Bearer YOUR_KEY'."
_UNKNOWN = "Incorrect API key provided."


_NO_DIGEST = "0" * 64  # what a miss is compared with (a key with this digest: a SHA-256 preimage search)


def _by_digest(hashes: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{digest: tier}`` -> ``{digest: (digest, tier)}`` (the stored digest, for `hmac.compare_digest`)."""
    out: dict[str, tuple[str, str]] = {}
    for digest, tier in hashes.items():
        d = digest.lower()
        if not _HEX64.fullmatch(d):
            raise KeyConfigError("KeyStore takes SHA-256 hex digests (64 hex digits), not keys")
        out[d] = (d, tier)
    return out


def _file_signature(path: Path) -> tuple[int, int, int]:
    """What says a file changed: (mtime in ns, size, inode) of what ``path`` names now."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


class _FileReload:
    """How a `KeyStore` re-reads its key file: the file, the config's tiers, the other sources'
    entries (digests only), the file's last signature, when to look next."""

    def __init__(self, path: Path, tiers: list[str], env_entries: list[tuple[str, str, str]],
                 hash_entries: list[tuple[str, str, str]], signature: tuple[int, int, int] | None,
                 check_s: float, allow_empty: bool) -> None:
        self.path, self.tiers, self.check_s, self.allow_empty = path, tiers, check_s, allow_empty
        self.env_entries, self.hash_entries = env_entries, hash_entries
        self.signature = signature
        self.clock: Callable[[], float] = time.monotonic
        self.next_check = self.clock() + check_s

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "clock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self.clock = time.monotonic


class KeyStore:
    """SHA-256 digests of API keys -> tier names.  No plaintext key is kept, and ``repr``/``str``
    show only counts.  Made by `from_config` with a key file, it re-reads the file when it changes
    (module docstring)."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        """``hashes``: SHA-256 hex digest -> tier name."""
        self._tiers = _by_digest(hashes)
        self._reload: _FileReload | None = None

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: AppConfig, environ: Mapping[str, str] | None = None,
                    *, allow_empty: bool = False, reload_check_s: float | None = RELOAD_CHECK_S) -> KeyStore:
        """The keys of every source in ``config.api_keys``, each checked against the config's
        tiers.  ``environ`` defaults to ``os.environ``.  An unset environment variable adds no
        keys; a configured file must exist.  No key at all is an error unless ``allow_empty``.
        With a key file, the store re-reads it when it changes, looking at most every
        ``reload_check_s`` seconds (None: never)."""
        environ = os.environ if environ is None else environ
        src = config.api_keys
        tiers = config.tier_names
        env_entries: list[tuple[str, str, str]] = []  # (digest, tier, where)
        if src.env is not None and environ.get(src.env, "").strip():
            env_entries = parse_env_keys(environ[src.env], tiers, f"environment variable {src.env}")
        file_entries: list[tuple[str, str, str]] = []
        signature = None
        if src.file is not None:
            try:
                signature = _file_signature(src.file)  # before reading: a change while reading is seen next time
            except OSError:
                pass  # parse_key_file says why
            file_entries = parse_key_file(src.file, tiers)
        hash_entries = [(d, t, f"config api_keys.hashes[{i}]") for i, (d, t) in enumerate(src.hashes.items())]
        entries = env_entries + file_entries + hash_entries
        if not entries and not allow_empty:
            hint = ",".join(f"dev-{t}-key:{t}" for t in tiers)
            sources = [f"environment variable {src.env} is unset or empty" if src.env else None,
                       f"file {src.file} has no keys" if src.file else None,
                       "api_keys.hashes is empty"]
            raise KeyConfigError(f"no API keys: {'; '.join(s for s in sources if s)} "
                                 f"(for local testing: export {src.env or 'TIERED_API_KEYS'}='{hint}')")
        store = cls._from_entries(entries)
        if src.file is not None and reload_check_s is not None:
            store._reload = _FileReload(Path(src.file), list(tiers), env_entries, hash_entries, signature,
                                        float(reload_check_s), allow_empty)
        return store

    @classmethod
    def _from_entries(cls, entries: Iterable[tuple[str, str, str]]) -> KeyStore:
        seen: dict[str, tuple[str, str]] = {}
        for digest, tier, where in entries:
            if digest in seen and seen[digest][0] != tier:
                raise KeyConfigError(f"{where}: the same key is also given for tier {seen[digest][0]!r} "
                                     f"({seen[digest][1]}); a key has one tier")
            seen.setdefault(digest, (tier, where))
        return cls({d: t for d, (t, _) in seen.items()})

    # --- reload ---------------------------------------------------------------------------------
    def reload_if_changed(self) -> bool:
        """Re-read the key file if its signature changed since it was last read (at most one
        ``os.stat`` per check period; `tier_for` calls this).  Returns whether new keys are in.  A
        file that does not read, parse or validate keeps the old keys (a warning names the file
        and the line, never a key)."""
        r = self._reload
        if r is None:
            return False
        now = r.clock()
        if now < r.next_check:
            return False
        r.next_check = now + r.check_s
        try:
            signature = _file_signature(r.path)
        except OSError as e:
            if r.signature is not None:
                logger.warning("API key file %s: cannot read it (%s); keeping the %d keys read before",
                               r.path, e.strerror or type(e).__name__, len(self))
            r.signature = None
            return False
        if signature == r.signature:
            return False
        r.signature = signature  # not tried again until it changes again
        try:
            entries = r.env_entries + parse_key_file(r.path, r.tiers) + r.hash_entries
            if not entries and not r.allow_empty:
                raise KeyConfigError(f"API key file {r.path}: no keys left in any source")
            new = self._from_entries(entries)
        except KeyConfigError as e:  # names the file and line, never a key
            logger.warning("%s; keeping the %d keys read before", e, len(self))
            return False
        self._tiers = new._tiers  # one assignment: a lookup sees the old keys or the new, never a mix
        logger.info("API key file %s re-read: %r", r.path, self)
        return True

    # --- lookup ---------------------------------------------------------------------------------
    def tier_for(self, authorization_header: str | None) -> str:
        """The tier of the key in an ``Authorization: Bearer KEY`` header (`identify`)."""
        return self.identify(authorization_header)[0]

    def identify(self, authorization_header: str | None) -> tuple[str, str]:
        """(tier, key id) of the key in an ``Authorization: Bearer KEY`` header; `AuthError`
        (401, ``invalid_api_key``) if the header is missing, malformed, not Bearer, or the key
        unknown.  The key id (`key_id`) names the key in logs, limits and metrics, never the key.
        Looks for a changed key file first (`reload_if_changed`)."""
        if self._reload is not None:
            self.reload_if_changed()
        if authorization_header is None or not authorization_header.strip(_OWS):
            raise AuthError(_MISSING)
        m = _AUTH_HEADER.fullmatch(authorization_header.strip(_OWS))
        if m is None or m.group(1).lower() != "bearer" or not is_valid_key(m.group(2)):
            raise AuthError(_MALFORMED)
        digest = hash_key(m.group(2))
        stored, tier = self._tiers.get(digest, (_NO_DIGEST, None))  # O(1): module docstring
        if not hmac.compare_digest(digest, stored) or tier is None:  # one comparison, hit or miss
            raise AuthError(_UNKNOWN)
        return tier, key_id(digest)

    # --- introspection (counts only) ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tiers)

    @property
    def tier_counts(self) -> dict[str, int]:
        """Number of keys per tier."""
        return dict(Counter(tier for _, tier in self._tiers.values()))

    def __repr__(self) -> str:
        counts = ", ".join(f"{t}={n}" for t, n in sorted(self.tier_counts.items()))
        return f"KeyStore({len(self)} keys: {counts})"

    __str__ = __repr__


# ------------------------------------------------------------------------------------ key sources

def _entry(key: str, tier: str, tiers: list[str], where: str) -> tuple[str, str, str]:
    if key.lower().startswith(HASH_PREFIX):
        digest = key[len(HASH_PREFIX):].lower()
        if not _HEX64.fullmatch(digest):
            raise KeyConfigError(f"{where}: '{HASH_PREFIX}' must be followed by a SHA-256 hex digest (64 hex digits)")
    elif not is_valid_key(key):
        raise KeyConfigError(f"{where}: the key has characters a Bearer token cannot carry "
                             "(allowed: letters, digits, -._~+/ and trailing =)")
    elif len(key) < MIN_KEY_LENGTH:
        raise KeyConfigError(f"{where}: {_TOO_SHORT}")
    else:
        digest = hash_key(key)
    if tier not in tiers:
        raise KeyConfigError(f"{where}: unknown tier {tier!r}; tiers are {', '.join(tiers)}")
    return digest, tier, where


def hashed_env_keys(config: AppConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The keys in the environment variable ``config.api_keys.env`` names, as SHA-256 digests, with
    ``config.api_keys.hashes``: ``{digest: tier}``, checked as `KeyStore.from_config` checks them
    (tiers, length, one tier per key; `KeyConfigError` naming the entry, never a key).  The
    launcher hands the app these instead of the variable (``api_keys.hashes``, ``api_keys.env:
    null``), so no process of the cluster has the keys in its environment."""
    environ = os.environ if environ is None else environ
    src = config.api_keys
    entries: list[tuple[str, str, str]] = []
    if src.env is not None and environ.get(src.env, "").strip():
        entries = parse_env_keys(environ[src.env], config.tier_names, f"environment variable {src.env}")
    entries += [(d, t, f"config api_keys.hashes[{i}]") for i, (d, t) in enumerate(src.hashes.items())]
    return {digest: tier for digest, (_, tier) in KeyStore._from_entries(entries)._tiers.items()}


def parse_env_keys(text: str, tiers: list[str], source: str) -> list[tuple[str, str, str]]:
    """``KEY:TIER,KEY:TIER`` -> ``[(digest, tier, where)]``; errors name ``source`` and the entry."""
    out = []
    for i, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        where = f"{source}, entry {i}"
        key, sep, tier = item.rpartition(":")
        if not sep or not key.strip() or not tier.strip():
            raise KeyConfigError(f"{where}: expected KEY:TIER")
        out.append(_entry(key.strip(), tier.strip(), tiers, where))
    return out


def parse_key_file(path: str | os.PathLike[str], tiers: list[str]) -> list[tuple[str, str, str]]:
    """A key file (``KEY TIER`` or ``KEY:TIER`` per line, ``#`` comments) -> ``[(digest, tier, where)]``;
    errors name the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyConfigError(f"API key file {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"API key file {path}, line {n}"
        parts = line.split()
        if len(parts) == 2:
            key, tier = parts
        elif len(parts) == 1 and ":" in parts[0]:
            key, _, tier = parts[0].rpartition(":")
        else:
            raise KeyConfigError(f"{where}: expected 'KEY TIER' or 'KEY:TIER'")
        if not key or not tier:
            raise KeyConfigError(f"{where}: expected 'KEY TIER' or 'KEY:TIER'")
        out.append(_entry(key, tier, tiers, where))
    return out


# ------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.auth", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print the SHA-256 hex digest of a key (use as sha256:DIGEST in key sources; "
                                   "its first 12 hex digits are the key's id in logs and api_keys.limits)")
    h.add_argument("key", help="the key, or - to read keys from stdin (one per line)")
    args = parser.parse_args(argv)
    keys = [line.strip() for line in sys.stdin if line.strip()] if args.key == "-" else [args.key]
    for i, key in enumerate(keys, start=1):
        if not is_valid_key(key):
            print(f"error: key {i} has characters a Bearer token cannot carry "
                  "(allowed: letters, digits, -._~+/ and trailing =)", file=sys.stderr)
            return 2
        if len(key) < MIN_KEY_LENGTH:  # a hashed entry cannot be checked later
            print(f"error: key {i}: {_TOO_SHORT}", file=sys.stderr)
            return 2
        print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
