"""Optional API keys. Each key has a public name (used in metrics and logs) and a secret.

Keys come from `TRB_TEACHER_API_KEYS="name:secret,name2:secret2"` and/or a file with one
`name:secret` per line (`#` comments allowed). With keys configured, every route but `/health`
needs `Authorization: Bearer <secret>` (or `X-API-Key: <secret>`).
"""

from __future__ import annotations

import hmac
from pathlib import Path


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


def load_keys(inline: str | None, file: str | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    if inline:
        keys.update(parse_keys(inline, "TRB_TEACHER_API_KEYS"))
    if file:
        try:
            keys.update(parse_keys(Path(file).read_text(), file))
        except OSError as exc:
            raise KeyError_(f"cannot read API key file {file}: {exc}") from exc
    return keys


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
    if authorization and authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    if not presented:
        return None
    found = None
    for secret, name in keys.items():
        if hmac.compare_digest(secret.encode(), presented.encode()):
            found = name
    return found
