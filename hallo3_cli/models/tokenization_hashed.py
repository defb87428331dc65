"""The random presets' tokenizer: a real ``transformers`` tokenizer that needs no vocabulary file."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from transformers import PreTrainedTokenizer


class HashedWordTokenizer(PreTrainedTokenizer):
    """The random presets' tokenizer: T5's special ids (pad 0, eos 1, unk 2) and every lower-cased,
    whitespace-separated word hashed (CRC-32) into the other ``vocab_size - 3`` ids, so any prompt maps to
    stable ids without a vocabulary file. A real ``transformers`` tokenizer (padding, truncation, eos,
    ``save_pretrained``/``from_pretrained``), used like T5's by the pipeline."""

    vocab_files_names = {"vocab_file": "hashed_words.json"}
    model_input_names = ["input_ids", "attention_mask"]
    SPECIALS = ("<pad>", "</s>", "<unk>")

    def __init__(self, vocab_file: str | None = None, vocab_size: int = 256, **kwargs: Any):
        if vocab_file is not None:
            with open(vocab_file) as f:
                vocab_size = int(json.load(f)["vocab_size"])
        if vocab_size <= len(self.SPECIALS):
            raise ValueError(f"vocab_size must exceed {len(self.SPECIALS)}, got {vocab_size}")
        self._size = vocab_size
        kwargs.setdefault("split_special_tokens", True)  # "</s>" typed in a prompt is a word like any other
        for name, token in (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            kwargs.setdefault(name, token)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        vocab = {token: index for index, token in enumerate(self.SPECIALS)}
        vocab.update({f"w{i}": i for i in range(len(self.SPECIALS), self._size)})
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        buckets = self._size - len(self.SPECIALS)
        return [f"w{len(self.SPECIALS) + zlib.crc32(word.encode()) % buckets}" for word in text.lower().split()]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.SPECIALS:
            return self.SPECIALS.index(token)
        return int(token[1:]) if token[:1] == "w" and token[1:].isdigit() else self.SPECIALS.index("<unk>")

    def _convert_id_to_token(self, index: int) -> str:
        return self.SPECIALS[index] if index < len(self.SPECIALS) else f"w{index}"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        eos = [self.eos_token_id]
        return token_ids_0 + eos if token_ids_1 is None else token_ids_0 + eos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list[int]:
        if already_has_special_tokens:
            return [int(i in (0, 1, 2)) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w") as f:
            json.dump({"vocab_size": self._size}, f)
        return (path,)
