"""API keys -> tiers: hashes only, strict Bearer parsing, an O(1) lookup confirmed by one constant-time
comparison, no key in any output."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app import auth
from serve_app.auth import AuthError, KeyConfigError, KeyStore, hash_key
from serve_app.config import AppConfig

KEYS = {"pk-alpha-111": "premium", "fk-beta-2222": "free", "fk-gamma-333": "free"}
ENV = {"TIERED_API_KEYS": ",".join(f"{k}:{t}" for k, t in KEYS.items())}


@pytest.fixture
def store() -> KeyStore:
    return KeyStore.from_config(AppConfig(), environ=ENV)


def test_hash_key() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(hash_key("x")) == 64


# ---------------------------------------------------------------------------------------- lookup

@pytest.mark.parametrize("key,tier", list(KEYS.items()))
def test_valid_key_gives_its_tier(store: KeyStore, key: str, tier: str) -> None:
    assert store.tier_for(f"Bearer {key}") == tier


@pytest.mark.parametrize("header", ["bearer pk-alpha-111", "BEARER pk-alpha-111", "Bearer   pk-alpha-111",
                                    " Bearer pk-alpha-111\t"])
def test_scheme_is_case_insensitive(store: KeyStore, header: str) -> None:
    assert store.tier_for(header) == "premium"


REJECTED = [
    ("missing header", None, "didn't provide an API key"),
    ("empty header", "", "didn't provide an API key"),
    ("blank header", "   ", "didn't provide an API key"),
    ("bare key", "pk-alpha-111", "Malformed"),
    ("basic scheme", "Basic pk-alpha-111", "Malformed"),
    ("scheme only", "Bearer", "Malformed"),
    ("scheme glued", "Bearerpk-alpha-111", "Malformed"),
    ("two tokens", "Bearer pk-alpha-111 extra", "Malformed"),
    ("bad token chars", "Bearer pk-alpha-111\"", "Malformed"),
    ("comma list", "Bearer pk-alpha-111, Bearer fk-beta-2222", "Malformed"),
    ("unknown key", "Bearer pk-alpha-112", "Incorrect API key"),
    ("key with other case", "Bearer PK-ALPHA-111", "Incorrect API key"),
    ("hash instead of key", f"Bearer {hash_key('pk-alpha-111')}", "Incorrect API key"),
]


@pytest.mark.parametrize("header,fragment", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_headers_are_401_invalid_api_key(store: KeyStore, header: str | None, fragment: str) -> None:
    with pytest.raises(AuthError) as info:
        store.tier_for(header)
    err = info.value
    assert (err.status_code, err.code, err.type) == (401, "invalid_api_key", "invalid_request_error")
    assert fragment in err.message
    assert err.headers == {"WWW-Authenticate": "Bearer"}
    body = err.to_openai()
    assert body == {"error": {"message": err.message, "type": "invalid_request_error", "param": None,
                              "code": "invalid_api_key"}}
    for key in [*KEYS, "pk-alpha-112", "PK-ALPHA-111"]:  # never echoes a key
        assert key not in str(err) and key not in repr(err) and key not in str(body)


@pytest.fixture
def compares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every `hmac.compare_digest` call of `auth` from now on."""
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a, b):  # noqa: ANN001
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return calls


def test_one_compare_digest_per_lookup_hit_or_miss(store: KeyStore, compares: list) -> None:
    for header, stored in [("Bearer pk-alpha-111", hash_key("pk-alpha-111")),
                           ("Bearer fk-gamma-333", hash_key("fk-gamma-333")),
                           ("Bearer unknown-key-000", auth._NO_DIGEST)]:
        compares.clear()
        try:
            store.tier_for(header)
        except AuthError:
            pass
        presented = hash_key(header.split()[1])
        assert compares == [(presented, stored)]  # the presented digest against the one found (or a dummy)


def _big_store(n: int) -> tuple[KeyStore, list[str]]:
    keys = [f"key-{i:06d}-{'x' * 8}" for i in range(n)]
    return KeyStore({hash_key(k): ("premium" if i % 2 else "free") for i, k in enumerate(keys)}), keys


def test_a_10000_key_store_does_the_same_work_as_a_2_key_store(compares: list) -> None:
    """Operation count: per lookup, one dict lookup and one compare_digest, whatever the size."""
    for n in (2, 10_000):
        store, keys = _big_store(n)
        for header in (f"Bearer {keys[0]}", f"Bearer {keys[-1]}", "Bearer not-a-stored-key"):
            compares.clear()
            try:
                store.tier_for(header)
            except AuthError:
                pass
            assert len(compares) == 1, (n, header)


def test_a_10000_key_store_answers_as_fast_as_a_2_key_store() -> None:
    """Wall time, loosely: the median of many interleaved batches; a lookup over every key (the
    old O(n) loop: ~5000x the work at 10,000 keys) would be far beyond the bound."""
    import statistics
    import time

    small, small_keys = _big_store(2)
    big, big_keys = _big_store(10_000)
    headers = {id(small): [f"Bearer {k}" for k in small_keys] + ["Bearer not-a-stored-key"],
               id(big): [f"Bearer {k}" for k in big_keys[:2]] + ["Bearer not-a-stored-key"]}

    def batch(store: KeyStore) -> float:
        hs = headers[id(store)]
        t0 = time.perf_counter()
        for _ in range(100):
            for h in hs:
                try:
                    store.tier_for(h)
                except AuthError:
                    pass
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {id(small): [], id(big): []}
    for _ in range(41):
        for s in (small, big):
            times[id(s)].append(batch(s))
    ratio = statistics.median(times[id(big)]) / statistics.median(times[id(small)])
    assert ratio < 4.0, ratio


# ------------------------------------------------------------------------------------ no plaintext

def _all_strings(obj, seen=None):  # noqa: ANN001, ANN202
    """Every string reachable from obj's attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _all_strings(k, seen)
            yield from _all_strings(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from _all_strings(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _all_strings(vars(obj), seen)


def test_only_hashes_in_memory(store: KeyStore) -> None:
    strings = list(_all_strings(store))
    assert strings, "the walk found nothing: vars(store) is empty?"
    for key in KEYS:
        assert not any(key in s for s in strings)
    assert set(vars(store)["_tiers"]) == {hash_key(k) for k in KEYS}


def test_repr_shows_counts_only(store: KeyStore) -> None:
    for text in (repr(store), str(store), f"{store}"):
        assert text == "KeyStore(3 keys: free=2, premium=1)"
        assert not any(k in text for k in KEYS) and not any(hash_key(k) in text for k in KEYS)
    assert len(store) == 3 and store.tier_counts == {"premium": 1, "free": 2}


# --------------------------------------------------------------------------------------- sources

def test_key_file_formats_and_hashes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(
        "# operators' keys\n"
        "pk-file-0001 premium\n"
        "fk-file-0002:free   # trailing comment\n"
        "\n"
        f"sha256:{hash_key('pk-hashed-3')} premium\n"
        f"SHA256:{hash_key('fk-hashed-4').upper()}:free\n"
    )
    cfg = AppConfig(api_keys={"env": None, "file": keys, "hashes": {hash_key("pk-inline-5"): "premium"}})
    store = KeyStore.from_config(cfg, environ={})
    assert len(store) == 5
    for key, tier in [("pk-file-0001", "premium"), ("fk-file-0002", "free"), ("pk-hashed-3", "premium"),
                      ("fk-hashed-4", "free"), ("pk-inline-5", "premium")]:
        assert store.tier_for(f"Bearer {key}") == tier


def test_env_and_file_combine(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("pk-file-0001 premium\npk-alpha-111 premium\n")  # same key, same tier: fine
    cfg = AppConfig(api_keys={"env": "TIERED_API_KEYS", "file": keys})
    store = KeyStore.from_config(cfg, environ=ENV)
    assert len(store) == 4 and store.tier_for("Bearer pk-file-0001") == "premium"
    # an unset env var adds nothing when the file has keys
    assert len(KeyStore.from_config(cfg, environ={})) == 2


ENV_CASES = [
    ("unknown tier", "pk-a-0123456789:premium,pk-b-0123456789:gold", "entry 2", "unknown tier 'gold'"),
    ("no tier", "pk-a-0123456789:premium,pk-b-0123456789", "entry 2", "expected KEY:TIER"),
    ("empty key", ":premium", "entry 1", "expected KEY:TIER"),
    ("bad chars", "pk a-0123456789:premium", "entry 1", "Bearer token"),
    ("conflict", "pk-a-0123456789:premium,pk-a-0123456789:free", "entry 2", "also given for tier 'premium'"),
    ("too short", "pk-a-0123456789:premium,pk-b-45678:free", "entry 2", "shorter than 12 characters"),
]


@pytest.mark.parametrize("value,where,fragment", [c[1:] for c in ENV_CASES], ids=[c[0] for c in ENV_CASES])
def test_bad_env_keys_name_the_variable_and_entry(value: str, where: str, fragment: str) -> None:
    with pytest.raises(KeyConfigError) as info:
        KeyStore.from_config(AppConfig(), environ={"TIERED_API_KEYS": value})
    msg = str(info.value)
    assert f"environment variable TIERED_API_KEYS, {where}" in msg and fragment in msg
    assert "pk-a" not in msg and "pk-b" not in msg


@pytest.mark.parametrize("key", ["dev-free-key", "dev-premium-key", "x" * 12, "A" * 200])
def test_keys_of_12_characters_or_more_are_accepted(key: str) -> None:
    store = KeyStore.from_config(AppConfig(), environ={"TIERED_API_KEYS": f"{key}:free"})
    assert store.tier_for(f"Bearer {key}") == "free"


def test_a_short_key_in_a_file_names_the_file_and_line_not_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# ok\npk-file-0001 premium\nshort-key01:free\n")
    with pytest.raises(KeyConfigError) as info:
        KeyStore.from_config(AppConfig(api_keys={"env": None, "file": keys}), environ={})
    msg = str(info.value)
    assert f"API key file {keys}, line 3" in msg and "shorter than 12 characters" in msg
    assert "short-key01" not in msg


def test_hashed_entries_are_not_length_checked(tmp_path: Path) -> None:
    """A digest does not tell its key's length: `hash` refuses short keys instead (test_cli_hash)."""
    keys = tmp_path / "keys"
    keys.write_text(f"sha256:{hash_key('tiny')} free\n")
    cfg = AppConfig(api_keys={"env": None, "file": keys, "hashes": {hash_key("tiny2"): "premium"}})
    store = KeyStore.from_config(cfg, environ={})
    assert store.tier_for("Bearer tiny") == "free" and store.tier_for("Bearer tiny2") == "premium"


def test_no_keys_is_an_error_with_a_dev_hint() -> None:
    with pytest.raises(KeyConfigError, match="export TIERED_API_KEYS='dev-premium-key:premium,dev-free-key:free'"):
        KeyStore.from_config(AppConfig(), environ={})
    assert len(KeyStore.from_config(AppConfig(), environ={"TIERED_API_KEYS": " "}, allow_empty=True)) == 0


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    cfg = AppConfig(api_keys={"env": None, "file": tmp_path / "absent"})
    with pytest.raises(KeyConfigError, match=f"API key file {tmp_path / 'absent'}: cannot read"):
        KeyStore.from_config(cfg, environ={})


def test_keystore_takes_digests_not_keys() -> None:
    with pytest.raises(KeyConfigError, match="digests"):
        KeyStore({"pk-alpha-111": "premium"})
    assert KeyStore({hash_key("k").upper(): "free"}).tier_for("Bearer k") == "free"


# ------------------------------------------------------------------------------- key file reload

OLD_KEY, NEW_KEY, ENV_KEY = "pk-old-key-000001", "fk-new-key-000002", "pk-env-key-000003"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _write(path: Path, text: str, n: int) -> None:
    """Write the key file and give it a distinct mtime (n seconds on), whatever the clock's resolution."""
    path.write_text(text)
    os.utime(path, ns=(1_700_000_000_000_000_000 + n * 1_000_000_000,) * 2)


def _tier(store: KeyStore, key: str) -> str | None:
    try:
        return store.tier_for(f"Bearer {key}")
    except AuthError:
        return None


@pytest.fixture
def reloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(store, key file, clock, stats): a store over a key file holding OLD_KEY, the env's ENV_KEY and
    a configured hash; its clock is ``clock``; ``stats`` counts the file's os.stat calls."""
    keys = tmp_path / "keys"
    _write(keys, f"{OLD_KEY} premium\n", 0)
    cfg = AppConfig(api_keys={"env": "TIERED_API_KEYS", "file": keys,
                              "hashes": {hash_key("pk-hash-key-000004"): "free"}})
    store = KeyStore.from_config(cfg, environ={"TIERED_API_KEYS": f"{ENV_KEY}:premium"})
    clock = Clock()
    store._reload.clock = clock
    store._reload.next_check = clock.t + auth.RELOAD_CHECK_S
    stats: list[Path] = []
    real = auth._file_signature
    monkeypatch.setattr(auth, "_file_signature", lambda path: stats.append(path) or real(path))
    return store, keys, clock, stats


def test_a_changed_key_file_is_re_read_on_the_request_path(reloading) -> None:
    store, keys, clock, stats = reloading
    assert _tier(store, OLD_KEY) == "premium" and _tier(store, NEW_KEY) is None
    _write(keys, f"# rotated\n{NEW_KEY} free\n", 1)
    assert _tier(store, NEW_KEY) is None  # not looked at before the check period is over
    clock.t += auth.RELOAD_CHECK_S
    assert _tier(store, NEW_KEY) == "free"
    assert _tier(store, OLD_KEY) is None  # removed from the file: gone
    assert _tier(store, ENV_KEY) == "premium" and _tier(store, "pk-hash-key-000004") == "free"  # the others stay
    assert len(store) == 3


def test_the_file_is_stat_ed_at_most_once_per_check_period(reloading) -> None:
    store, keys, clock, stats = reloading
    for _ in range(1000):
        _tier(store, OLD_KEY)
    assert stats == []
    for _ in range(5):
        clock.t += auth.RELOAD_CHECK_S
        for _ in range(100):
            _tier(store, OLD_KEY)
    assert stats == [keys] * 5  # one cheap os.stat per period, no re-read (unchanged)
    assert 1 <= auth.RELOAD_CHECK_S <= 10


BAD_FILES = [
    ("short key", f"{NEW_KEY} free\nshortkey-1 premium\n", "line 2", "shorter than 12 characters"),
    ("unknown tier", f"{NEW_KEY} gold\n", "line 1", "unknown tier 'gold'"),
    ("malformed", f"{NEW_KEY} free extra\n", "line 1", "expected 'KEY TIER'"),
    ("conflict with env", f"{ENV_KEY} free\n", "line 1", "also given for tier"),
    ("not UTF-8", None, "", "cannot read"),
]


@pytest.mark.parametrize("text,line,fragment", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_an_invalid_new_file_keeps_the_old_keys_and_warns_without_a_key(reloading, caplog, text, line,
                                                                          fragment) -> None:
    store, keys, clock, _ = reloading
    if text is None:
        keys.write_bytes(b"\xff\xfe" + NEW_KEY.encode() + b" free\n")
        os.utime(keys, ns=(1_700_000_005_000_000_000,) * 2)
    else:
        _write(keys, text, 1)
    clock.t += auth.RELOAD_CHECK_S
    with caplog.at_level("WARNING", logger="serve_app.auth"):
        assert _tier(store, OLD_KEY) == "premium" and _tier(store, NEW_KEY) is None
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert f"API key file {keys}" in msg and fragment in msg and "keeping the 3 keys read before" in msg
    if line:
        assert f"{keys}, {line}" in msg
    for key in (OLD_KEY, NEW_KEY, ENV_KEY, "shortkey-1"):
        assert key not in caplog.text
    # the same bad file is not tried again; a fixed one is
    clock.t += auth.RELOAD_CHECK_S
    caplog.clear()
    assert _tier(store, NEW_KEY) is None and not caplog.records
    _write(keys, f"{NEW_KEY} free\n", 2)
    clock.t += auth.RELOAD_CHECK_S
    assert _tier(store, NEW_KEY) == "free" and _tier(store, OLD_KEY) is None


def test_a_removed_or_emptied_file_keeps_the_old_keys(tmp_path: Path, caplog) -> None:
    keys = tmp_path / "keys"
    _write(keys, f"{OLD_KEY} premium\n", 0)
    store = KeyStore.from_config(AppConfig(api_keys={"env": None, "file": keys}), environ={}, reload_check_s=0)
    keys.unlink()
    with caplog.at_level("WARNING", logger="serve_app.auth"):
        assert _tier(store, OLD_KEY) == "premium"
        assert _tier(store, OLD_KEY) == "premium"
    assert len(caplog.records) == 1 and "cannot read it" in caplog.records[0].getMessage()
    _write(keys, "# nothing\n", 1)  # no key left anywhere: refused like at startup
    caplog.clear()
    with caplog.at_level("WARNING", logger="serve_app.auth"):
        assert _tier(store, OLD_KEY) == "premium"
    assert "no keys left" in caplog.records[0].getMessage()
    _write(keys, f"{NEW_KEY} free\n", 2)
    assert _tier(store, NEW_KEY) == "free" and _tier(store, OLD_KEY) is None


def test_reload_survives_pickling_and_can_be_off(tmp_path: Path) -> None:
    import pickle

    keys = tmp_path / "keys"
    _write(keys, f"{OLD_KEY} premium\n", 0)
    cfg = AppConfig(api_keys={"env": None, "file": keys})
    shipped = pickle.loads(pickle.dumps(KeyStore.from_config(cfg, environ={}, reload_check_s=0)))
    fixed = KeyStore.from_config(cfg, environ={}, reload_check_s=None)
    _write(keys, f"{NEW_KEY} free\n", 1)
    assert _tier(shipped, NEW_KEY) == "free"
    assert _tier(fixed, NEW_KEY) is None and _tier(fixed, OLD_KEY) == "premium"


# ------------------------------------------------------------------------------------------- CLI

def test_cli_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth.main(["hash", "pk-alpha-111"]) == 0
    assert capsys.readouterr().out == hash_key("pk-alpha-111") + "\n"
    assert auth.main(["hash", "bad key"]) == 2
    err = capsys.readouterr().err
    assert "Bearer token" in err and "bad key" not in err
    assert auth.main(["hash", "short-key01"]) == 2  # hashed entries cannot be length-checked later
    captured = capsys.readouterr()
    assert captured.out == "" and "shorter than 12 characters" in captured.err and "short-key01" not in captured.err


def test_cli_module_entry_point_and_stdin() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "serve_app.auth", "hash", "-"], input="key-one-0001\nkey-two-0002\n",
                         capture_output=True, text=True, cwd=root, check=True).stdout
    assert out.split() == [hash_key("key-one-0001"), hash_key("key-two-0002")]
