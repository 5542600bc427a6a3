"""A character-level tokenizer for the arithmetic task, built locally with `tokenizers`.

Why character level: every token is one character, so encode(prompt) + encode(solution) is exactly
encode(prompt + solution). Prompt/response boundaries then never merge across a token, which keeps
the loss mask and the teacher/student alignment trivial.

No special token is added by `encode`/`__call__`: the models are trained on `prompt + solution`
followed by `<eos>`, with no `<bos>`. `<bos>` exists only so that configs that expect one have it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
ALPHABET = string.digits + "+-*=#()?:., \n" + string.ascii_lowercase + string.ascii_uppercase


def _vocab() -> dict[str, int]:
    """Special tokens first (pad is id 0), then one id per character of the alphabet."""
    symbols = SPECIAL_TOKENS + list(dict.fromkeys(ALPHABET))
    return {s: i for i, s in enumerate(symbols)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer: one token per character, unknown characters map to `<unk>`."""
    core = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, out: str | Path) -> None:
    """`save_pretrained`, naming the class `PreTrainedTokenizerFast` so transformers 4.x loads it too.

    transformers 5 writes its own class name (`TokenizersBackend`), which 4.x does not know; both
    releases load a `PreTrainedTokenizerFast` from the same tokenizer.json.
    """
    tok.save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
