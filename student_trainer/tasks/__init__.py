"""Built-in tasks: the arithmetic problem generator, its verifier, tokenizer and SFT helpers."""
