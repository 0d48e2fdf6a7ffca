"""An HF tokenizer folder (`tokenizer.json`, `tokenizer_config.json`, optionally
`chat_template.jinja`) used in place of the GGUF's own vocabulary, with the same interface as
`LlamaModel`'s text methods, so the compiler tokenizes exactly as transformers does."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import InvalidFileError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFTokenizer:
    def __init__(self, folder: str | os.PathLike[str]):
        self.path = Path(folder)
        tj = self.path / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises untyped errors on malformed files
            raise InvalidFileError(f"{tj}: not a readable HF tokenizer: {exc}") from exc
        cfg_path = self.path / "tokenizer_config.json"
        try:
            self._config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        except (OSError, ValueError) as exc:
            raise InvalidFileError(f"{cfg_path}: cannot read: {exc}") from exc
        if not isinstance(self._config, dict):
            raise InvalidFileError(f"{cfg_path}: expected a JSON object")
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)

    def chat_template(self) -> str | None:
        """`chat_template.jinja` (transformers 5 layout), else `chat_template` in tokenizer_config.json
        (a string, or a list of named templates of which "default" is used)."""
        jinja = self.path / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text(encoding="utf-8")
        tpl = self._config.get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        return tpl if isinstance(tpl, str) else None

    def special_token_texts(self) -> dict[str, str]:
        out = {}
        for name in _SPECIAL_NAMES:
            value = self._config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[name] = value
        return out

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Ids as `tokenizer(text, add_special_tokens=False)`: added tokens in the text are matched."""
        if not special:
            raise ValueError("HFTokenizer always matches added tokens, as transformers does")
        return self._tok.encode(text, add_special_tokens=False).ids

    def single_token(self, text: str) -> int:
        idx = self._tok.token_to_id(text)
        if idx is None:
            raise InvalidFileError(f"{self.path}: {text!r} is not a token of this tokenizer")
        return idx

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)
