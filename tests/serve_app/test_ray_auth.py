"""`serve_app.ray_auth`: Ray token authentication stays on, with a private token per run.  (That a
running cluster really refuses calls without its token is checked by conftest's `check_ray_auth`,
on every cluster the tests start.)"""

import stat
from pathlib import Path

import pytest

from serve_app import ray_auth
from serve_app.ray_auth import MODE, TOKEN, TOKEN_PATH, existing_token, private_token, require_enabled, require_token_mode


def test_a_private_token_is_random_owner_only_and_gone_after(tmp_path):
    env = {TOKEN: "a-token-from-elsewhere", "OTHER": "x"}
    with private_token(env, dir=str(tmp_path)) as path:
        assert env[TOKEN_PATH] == str(path) and TOKEN not in env and MODE not in env  # Ray sets the mode
        token = path.read_text()
        assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex (as Ray's own generator)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.parent.parent == tmp_path
        with private_token({}, dir=str(tmp_path)) as other:
            assert other.read_text() != token
    assert env == {TOKEN: "a-token-from-elsewhere", "OTHER": "x"}
    assert not path.parent.exists()


def test_the_environment_is_restored_and_the_token_removed_on_error(tmp_path):
    env = {MODE: "token", TOKEN_PATH: "/somewhere/else"}
    with pytest.raises(KeyError), private_token(env, dir=str(tmp_path)) as path:
        raise KeyError
    assert env == {MODE: "token", TOKEN_PATH: "/somewhere/else"}
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["disabled", "", "none", "Token", " token"])
def test_any_mode_but_token_is_refused(value, tmp_path):
    with pytest.raises(RuntimeError, match="only with token authentication"):
        require_token_mode({MODE: value})
    with pytest.raises(RuntimeError, match="only with token authentication"), private_token({MODE: value},
                                                                                             dir=str(tmp_path)):
        pass
    assert list(tmp_path.iterdir()) == []
    require_token_mode({MODE: "token"})
    require_token_mode({})


def test_require_enabled():
    require_enabled({MODE: "token"})
    for env in ({}, {MODE: "none"}):
        with pytest.raises(RuntimeError, match="without token authentication"):
            require_enabled(env)


def test_an_existing_token_is_kept_only_when_asked(tmp_path):
    given = tmp_path / "given"
    given.write_text("0123abcd")
    env = {TOKEN_PATH: str(given)}
    assert existing_token(env) == TOKEN_PATH and existing_token({TOKEN: "t"}) == TOKEN and existing_token({}) is None
    with private_token(env, keep_existing=True, dir=str(tmp_path)) as path:
        assert path is None and env == {TOKEN_PATH: str(given)}
    with private_token(env, keep_existing=False, dir=str(tmp_path)) as path:
        assert env[TOKEN_PATH] == str(path) != str(given)
    assert env == {TOKEN_PATH: str(given)}


@pytest.mark.parametrize("content", [None, "", " \n"])
def test_a_token_path_naming_no_token_is_refused(tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RuntimeError, match=TOKEN_PATH):
        existing_token({TOKEN_PATH: str(path)})
    with pytest.raises(RuntimeError, match=TOKEN_PATH), private_token({TOKEN_PATH: str(path)}, keep_existing=True):
        pass


def test_a_token_file_is_never_written_over_or_through_a_link(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / ray_auth.TOKEN_FILE).symlink_to(target)
    with pytest.raises(FileExistsError):
        ray_auth.write_token(tmp_path)
    assert target.read_text() == "keep"


def test_nothing_is_written_to_the_users_ray_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with private_token({}) as path:
        assert Path.home() / ".ray" not in path.parents
    assert not (tmp_path / "home").exists()
