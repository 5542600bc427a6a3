"""Optional API keys. Each key has a public name (used in metrics and logs) and a secret.

Keys come from `TRB_TEACHER_API_KEYS="name:secret,name2:secret2"` and/or a file with one
`name:secret` per line (`#` comments allowed). With keys configured, every route but `/health`
needs `Authorization: Bearer <secret>` (or `X-API-Key: <secret>`, or HTTP Basic with the secret as the
password: what a client sends for a URL such as `http://trl:<secret>@host:8000` or a ~/.netrc entry,
the only way to give a key to clients that set no header of their own, like TRL's; docs/interop.md).

A shared key file (`--shared-key-file`, used by docker-compose.yml) lets a stack start with no key
set by hand: the teacher mints a random key into a file that only it and its trainers can see, and
accepts it as client `trainer`; the trainers read it through `TRB_API_KEY_FILE`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
from pathlib import Path

SHARED_KEY_NAME = "trainer"


class KeyError_(ValueError):
    """A malformed key list."""


def parse_keys(text: str, source: str) -> dict[str, str]:
    """`name:secret` entries separated by commas or newlines -> {secret: name}."""
    keys: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep or not name.strip() or len(secret.strip()) < 8:
            raise KeyError_(f"{source}: expected name:secret with a secret of 8+ characters, got {name.strip()!r}")
        keys[secret.strip()] = name.strip()
    return keys


def load_keys(inline: str | None, file: str | None, shared_file: str | None = None,
              env_key: str | None = None) -> dict[str, str]:
    """{secret: name} from the settings; with `shared_file`, plus the shared key (see `shared_key`)."""
    keys: dict[str, str] = {}
    if inline:
        keys.update(parse_keys(inline, "TRB_TEACHER_API_KEYS"))
    if file:
        try:
            keys.update(parse_keys(Path(file).read_text(), file))
        except OSError as exc:
            raise KeyError_(f"cannot read API key file {file}: {exc}") from exc
    if shared_file:
        keys[shared_key(Path(shared_file), env_key)] = SHARED_KEY_NAME
    return keys


def shared_key(path: Path, env_key: str | None) -> str:
    """The trainers' key: `env_key` ($TRB_API_KEY) when set, leaving `path` alone; else the key in
    `path`, minted there at the first start. Why reuse, not rotate: trainers still running read the
    key once, so a teacher restart with a new key would lock them out."""
    if env_key and env_key.strip():
        return _checked(env_key.strip(), "TRB_API_KEY")
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    return mint_key(path)


def mint_key(path: Path) -> str:
    """Write a fresh random key to `path` (mode 0600) unless one is there already; return the key in it.

    The key is written to a private temporary file, then hard-linked into place: the link fails if
    another teacher (a replica sharing the volume) won the race, and nobody ever reads a half-written key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(16) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process minted first: use its key
    except OSError as exc:
        raise KeyError_(f"cannot write the shared key file {path}: {exc}; the folder must be writable by this "
                        "user (docker compose: rebuild the images, or remove the stale key volume)") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> str:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeyError_(f"cannot read the shared key file {path}: {exc}") from exc
    return _checked(text.strip(), f"shared key file {path} (delete it to mint a new key)")


def _checked(secret: str, source: str) -> str:
    if len(secret) < 8 or any(c.isspace() or c in ",#" for c in secret):
        raise KeyError_(f"{source}: a key needs 8+ characters and no spaces, commas or '#' "
                        "(e.g. openssl rand -hex 16)")
    return secret


def load_secret(inline: str | None, file: str | None, source: str) -> str | None:
    """One secret from a setting or, taking precedence, a file (whitespace around it dropped)."""
    if file:
        try:
            inline = Path(file).read_text()
        except OSError as exc:
            raise KeyError_(f"cannot read {source} file {file}: {exc}") from exc
    return (inline or "").strip() or None


def key_name(keys: dict[str, str], authorization: str | None, x_api_key: str | None) -> str | None:
    """The name of the presented key, or None; compares secrets in constant time."""
    presented = x_api_key or ""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        presented = credentials.strip()
    elif scheme.lower() == "basic":
        presented = basic_password(credentials.strip())
    if not presented:
        return None
    found = None
    for secret, name in keys.items():
        if hmac.compare_digest(secret.encode(), presented.encode()):
            found = name
    return found


def basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (base64 of `user:password`; the user part is not checked:
    the key alone names the client), or "" when they are malformed."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]
