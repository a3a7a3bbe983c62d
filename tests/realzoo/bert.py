"""What the MiniLM sentence encoder needs without transformers/tokenizers/safetensors installed: a safetensors
reader, BERT's uncased WordPiece tokenizer, and BERT's encoder (the HuggingFace ``BertModel`` layout, so the
published state dict loads by name) with sentence-transformers' mean pooling and L2 normalization."""

from __future__ import annotations

import json
import struct
import unicodedata
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The format: an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets), raw data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return tensors


class WordPiece:
    """BertTokenizer(do_lower_case=True): basic tokenization (lower case, accents stripped, punctuation split),
    then greedy longest-match-first WordPiece with ``##`` continuations; [CLS] ... [SEP], padded with [PAD]."""

    def __init__(self, vocab_text: str, length: int) -> None:
        self.vocab = {token: i for i, token in enumerate(vocab_text.splitlines())}
        self.length = length

    @staticmethod
    def basic(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            word = ""
            for c in chunk:
                if unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                    words += [word, c] if word else [c]
                    word = ""
                else:
                    word += c
            if word:
                words.append(word)
        return words

    def wordpiece(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def encode(self, text: str) -> dict[str, np.ndarray]:
        ids = [i for w in self.basic(text) for i in self.wordpiece(w)][: self.length - 2]
        ids = [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (self.length - len(ids))
        ids += [self.vocab["[PAD]"]] * (self.length - len(ids))
        return {"input_ids": np.array([ids], np.int64), "attention_mask": np.array([mask], np.int64),
                "token_type_ids": np.zeros((1, self.length), np.int64)}


def sentence_encoder(config: dict):
    """BertModel (post-LayerNorm, GELU) + mean pooling over the attention mask + L2 normalization."""
    import torch
    from torch import nn

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
            self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
            self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, input_ids, token_type_ids):
            positions = torch.arange(input_ids.shape[1])[None]
            x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
            return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Module()
            self.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(self.attention.self, name, nn.Linear(hidden, hidden))
            self.attention.output = nn.Module()
            self.attention.output.dense = nn.Linear(hidden, hidden)
            self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(hidden, config["intermediate_size"])
            self.output = nn.Module()
            self.output.dense = nn.Linear(config["intermediate_size"], hidden)
            self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x, bias):
            b, t, _ = x.shape
            split = lambda y: y.view(b, t, heads, hidden // heads).transpose(1, 2)  # noqa: E731
            sa = self.attention.self
            q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
            scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, hidden)
            x = self.attention.output.LayerNorm(x + self.attention.output.dense(context))
            inner = nn.functional.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(x + self.output.dense(inner))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
            x = self.embeddings(input_ids, token_type_ids)
            for layer in self.encoder.layer:
                x = layer(x, bias)
            pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    return Encoder()
