"""A tokenizer fingerprint: the same hash on both sides means token ids mean the same strings.

A student and teacher that disagree on even one id silently train on garbage, so the client
compares this hash with the server's before any work. It covers the vocabulary (token -> id),
the added tokens and the special-token roles (bos/eos/pad/unk), and nothing cosmetic.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary and special tokens of a Hugging Face tokenizer (16 hex chars)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    roles = {
        role: getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "unk")
    }
    specials = sorted(
        (tok, tokenizer.convert_tokens_to_ids(tok)) for tok in tokenizer.all_special_tokens
    )
    blob = json.dumps({"vocab": vocab, "roles": roles, "specials": specials}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
