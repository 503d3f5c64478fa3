"""A byte-level BPE tokenizer trained on a corpus, saved in Hugging Face format.

Real Pythia uses its own 50k tokenizer; the tiny suite trains a small one (4k by default) so that
a 128-dimensional model can afford its embedding table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

EOS = "<|endoftext|>"


def train_tokenizer(documents: Sequence[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on `documents` and save it to `out_dir` as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def encode_documents(tokenizer, documents: Sequence[str]) -> np.ndarray:
    """One stream of token ids: each document followed by the end-of-text token (as in Pythia)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoding in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        ids.extend(encoding)
        ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    return np.asarray(ids, dtype=dtype)
