"""The built-in tokenizer: Hugging Face ``tokenizers`` reading a package's ``tokenizer.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

import nextoken
from nextoken import IncrementalDecoder, ModelPackageError


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer, with the chat template and special tokens of ``tokenizer_config.json``."""

    def __init__(self, backend: _Backend, config: dict[str, Any] | None = None) -> None:
        self._tok = backend
        config = config or {}
        self.adds_bos = bool(backend.encode("", add_special_tokens=True).ids)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special_tokens = {
            key: (value.get("content") if isinstance(value, dict) else value)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance((value := config.get(key)), (str, dict))
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """Load ``tokenizer.json`` at ``path`` (and ``tokenizer_config.json`` / ``chat_template.jinja`` beside it)."""
        path = Path(path)
        try:
            backend = _Backend.from_file(str(path))
        except Exception as exc:
            raise ModelPackageError(f"cannot read tokenizer {path}: {exc}") from None
        config: dict[str, Any] = {}
        cfg = path.with_name("tokenizer_config.json")
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise ModelPackageError(f"cannot read {cfg}: {exc}") from None
        jinja = path.with_name("chat_template.jinja")
        if "chat_template" not in config and jinja.is_file():
            config["chat_template"] = jinja.read_text()
        return cls(backend, config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (what constrained decoding builds its vocabulary from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decoder(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, context)


def load(package: Path, manifest: Any) -> HFTokenizer:
    """Hugging Face tokenizers (tokenizer.json)."""
    if not manifest.tokenizer_file:
        raise ModelPackageError(f"{package} names no tokenizer file in nextoken.json")
    path = Path(package) / manifest.tokenizer_file
    if not path.is_file():
        raise ModelPackageError(f"{path} is missing (named by nextoken.json); re-export the package")
    return HFTokenizer.from_file(path)


@nextoken.hookimpl
def register_tokenizers(register):
    register("hf", load)
