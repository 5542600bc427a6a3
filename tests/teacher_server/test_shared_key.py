"""The shared key file of docker-compose.yml: minted once (0600), reused, overridden by $TRB_API_KEY,
and a real server that uses it refuses requests without the key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess
from teacher_server.auth import KeyError_, load_keys, mint_key, shared_key


def test_first_start_mints_a_private_random_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = shared_key(path, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key + "\n" and len(key) == 32 and int(key, 16) >= 0
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert shared_key(tmp_path / "other", None) != key


def test_later_starts_reuse_the_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = shared_key(path, None)
    before = path.stat()
    assert shared_key(path, None) == key and shared_key(path, "") == key
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_ino == before.st_ino


def test_a_key_minted_by_another_process_wins(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("minted-elsewhere-123\n")
    assert mint_key(path) == "minted-elsewhere-123"  # the link to a taken name fails; the file is kept
    assert path.read_text() == "minted-elsewhere-123\n" and list(tmp_path.iterdir()) == [path]


def test_env_key_takes_precedence_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "key"
    assert shared_key(path, "my-own-key-42") == "my-own-key-42"
    assert not path.exists()
    minted = shared_key(path, None)
    assert shared_key(path, " my-own-key-42\n") == "my-own-key-42" and path.read_text() == minted + "\n"


def test_keys_merge_under_the_trainer_name(tmp_path: Path) -> None:
    keys = load_keys("alice:alice-secret-1", None, str(tmp_path / "key"), "env-key-1234")
    assert keys == {"alice-secret-1": "alice", "env-key-1234": "trainer"}
    assert load_keys(None, None, None, "env-key-1234") == {}  # $TRB_API_KEY alone changes nothing


@pytest.mark.parametrize("bad", ["short", "has space-in-it", "comma,in-the-key"])
def test_bad_keys_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(KeyError_, match="TRB_API_KEY: a key needs 8"):
        shared_key(tmp_path / "key", bad)
    (tmp_path / "key").write_text(bad)
    with pytest.raises(KeyError_, match="delete it to mint a new key"):
        shared_key(tmp_path / "key", None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_says_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(KeyError_, match="cannot write the shared key file.*rebuild the images"):
        shared_key(folder / "key", None)


def test_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyError_, match="cannot write the shared key file"):
        shared_key(tmp_path / "absent" / "key", None)


def test_server_with_a_minted_key_refuses_requests_without_it(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRB_API_KEY", raising=False)
    monkeypatch.delenv("TRB_TEACHER_API_KEYS", raising=False)
    path = tmp_path / "key"
    server = ServerProcess(tiny_model, "--shared-key-file", str(path)).wait_ready()
    try:
        key = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert httpx.get(f"{server.url}/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer not-the-key-1"}):
            resp = httpx.get(f"{server.url}/v1/model", headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        ok = httpx.post(f"{server.url}/v1/score", json={"sequences": [[1, 2]]},
                        headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert 'client="trainer"' in httpx.get(f"{server.url}/metrics", headers={"x-api-key": key}).text
    finally:
        server.stop()
