"""Calibration text: where it comes from and how it becomes token windows.

Sources: a text file, a folder of text files, a JSONL file (one object per line, its "text" field),
or a Hugging Face dataset name (`name`, `name:config`, optional `@split`, needs the hub).
Without a source, the Debian license texts in /usr/share/common-licenses are used, split by license
family so no evaluation text has a near-copy in calibration:
  calibration: GPL-1/2/3, LGPL-2/2.1/3, GFDL-1.2/1.3, Artistic, BSD, CC0-1.0
  held out for evaluation (`default_eval_text`): Apache-2.0, MPL-1.1, MPL-2.0
Samples are `num_samples` windows of `seq_len` tokens at seeded random offsets of the concatenated
tokens (texts joined by the tokenizer's EOS): the same seed gives the same samples.
"""

from __future__ import annotations

import json
import os

import torch

LICENSE_DIR = "/usr/share/common-licenses"
CALIB_LICENSES = ("GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "GFDL-1.2", "GFDL-1.3",
                  "Artistic", "BSD", "CC0-1.0")
EVAL_LICENSES = ("Apache-2.0", "MPL-1.1", "MPL-2.0")


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _license_texts(names) -> list[str]:
    paths = [os.path.join(LICENSE_DIR, n) for n in names]
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        raise FileNotFoundError(f"no license texts in {LICENSE_DIR} (expected {list(names)}); pass --calib TEXT_OR_DATASET")
    return [_read(p) for p in found]


def default_calibration_texts() -> list[str]:
    return _license_texts(CALIB_LICENSES)


def default_eval_text() -> str:
    return "\n\n".join(_license_texts(EVAL_LICENSES))


def _jsonl(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{i}: every JSONL line needs a string field 'text'")
            texts.append(row["text"])
    return texts


def _folder(path: str) -> list[str]:
    seen, texts = set(), []
    for name in sorted(os.listdir(path)):
        full = os.path.realpath(os.path.join(path, name))
        if os.path.isfile(full) and full not in seen and not name.startswith("."):
            seen.add(full)
            texts.extend(_jsonl(full) if name.endswith(".jsonl") else [_read(full)])
    if not texts:
        raise ValueError(f"calibration folder {path} has no files")
    return texts


def _hf_dataset(spec: str) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown name
        raise ValueError(f"calibration source {spec!r} is not a file or folder, and loading it as a Hugging Face "
                         f"dataset failed: {e}") from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def load_texts(source: str | None) -> list[str]:
    """Calibration texts from a file, folder, JSONL, dataset name, or (None) the default licenses."""
    if source is None:
        return default_calibration_texts()
    if os.path.isdir(source):
        return _folder(source)
    if os.path.isfile(source):
        return _jsonl(source) if source.endswith(".jsonl") else [_read(source)]
    if source.startswith((os.sep, ".", "~")) or source.endswith((".txt", ".jsonl", ".json", ".md")):
        raise ValueError(f"calibration source {source!r}: no such file or folder")  # a path, not a dataset name
    return _hf_dataset(source)


def tokenize_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream [L], joined by EOS (or nothing when the tokenizer has none)."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        if ids:
            ids.extend(sep)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer, texts: list[str], num_samples: int = 32, seq_len: int = 256,
                        seed: int = 0) -> torch.Tensor:
    """-> [num_samples, seq_len] token ids: windows at seeded random offsets of the token stream."""
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(f"need a positive sample count and length, got {num_samples} x {seq_len}")
    ids = tokenize_texts(tokenizer, texts)
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
