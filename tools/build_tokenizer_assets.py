#!/usr/bin/env python
"""Build the two offline SDXL CLIP tokenizer folders from CLIP's BPE merge list.

The only input is ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside the ``open_clip_torch`` wheel, e.g.
``pip download --no-deps open_clip_torch -d /tmp/oc`` and unzip ``open_clip/bpe_simple_vocab_16e6.txt.gz``).
From it this script derives the vocabulary the same way CLIP does:

1. the 256 printable stand-ins of the byte-to-unicode table, in table order;
2. the same 256 symbols with the end-of-word marker ``</w>`` appended;
3. one entry per merge (the two halves joined), for the first 49152 - 256 - 2 merges of the file;
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

That gives 49408 entries. It writes, into ``library/sdxl/assets/tokenizer`` and ``.../tokenizer_2`` by default,
``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``, which
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads without a network. Tokenizer 1 pads with
``<|endoftext|>`` (49407), tokenizer 2 with ``!`` (id 0), as SDXL was trained.

Usage::

    python tools/build_tokenizer_assets.py --bpe /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from library.console_logging import take_over_console, tool_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.atomic_io import atomic_write_text  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger("tools.build_tokenizer_assets")

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# CLIP keeps 49152 "base" entries (256 bytes + 256 bytes</w> + merges) minus the 2 special tokens' slots.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894


def byte_unicode_table() -> dict[int, str]:
    """Map each byte value to a printable unicode character (the GPT-2/CLIP byte-level table).

    Bytes that already are printable, non-space Latin-1 characters map to themselves; the remaining ones
    are assigned code points from 256 upwards, in increasing byte order. Insertion order (printable ones
    first) is the order CLIP uses for the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges(bpe_path: str) -> list[tuple[str, str]]:
    """Read the merge pairs CLIP uses from the gzipped BPE file (first line is a version header)."""
    if not os.path.isfile(bpe_path):
        raise UserError(f"BPE file not found: {bpe_path!r}. Give the path to bpe_simple_vocab_16e6.txt.gz.")
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {bpe_path!r} as a gzipped UTF-8 text file ({e}).") from e
    body = lines[1 : NUM_MERGES + 1]
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{bpe_path!r} line {i}: expected two symbols per merge line, got {line!r}.")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise UserError(
            f"{bpe_path!r} holds {len(merges)} merges, CLIP needs {NUM_MERGES}: is it bpe_simple_vocab_16e6.txt.gz?"
        )
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Build CLIP's token -> id table from the merges (see the module docstring for the order)."""
    symbols = list(byte_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"built a vocabulary of {len(vocab)} distinct tokens, expected {VOCAB_SIZE}.")
    return vocab


def tokenizer_config(pad_token: str) -> dict:
    """The ``tokenizer_config.json`` content for one SDXL tokenizer."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "padding_side": "right",
        "truncation_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
    }


def special_tokens_map(pad_token: str) -> dict:
    """The ``special_tokens_map.json`` content for one SDXL tokenizer."""
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}


def _write_text(path: str, text: str) -> None:
    atomic_write_text(path, text, "the tokenizer file")


def write_tokenizer_folder(folder: str, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    """Write one loadable tokenizer folder."""
    os.makedirs(folder, exist_ok=True)
    _write_text(os.path.join(folder, "vocab.json"), json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    _write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(tokenizer_config(pad_token), indent=2) + "\n")
    _write_text(
        os.path.join(folder, "special_tokens_map.json"), json.dumps(special_tokens_map(pad_token), indent=2) + "\n"
    )
    logger.info("wrote %s (pad %r)", folder, pad_token)


def verify_folder(folder: str, expected_pad_id: int) -> None:
    """Load the folder with transformers and check the reference tokenization and padding."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("a photo of a cat", padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids
    want = [49406, 320, 1125, 539, 320, 2368, 49407]
    if ids[:7] != want or any(i != expected_pad_id for i in ids[7:]) or len(ids) != MODEL_MAX_LENGTH:
        raise UserError(f"{folder}: self-check failed, got {ids[:10]}... expected {want} then pad {expected_pad_id}.")
    logger.info("verified %s (%s, vocab %d)", folder, type(tok).__name__, len(tok))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpe", required=True, help="path to bpe_simple_vocab_16e6.txt.gz (from open_clip_torch)")
    parser.add_argument(
        "--out",
        default=os.path.join(REPO_ROOT, "library", "sdxl", "assets"),
        help="folder that receives tokenizer/ and tokenizer_2/ (default: library/sdxl/assets)",
    )
    parser.add_argument("--no_verify", action="store_true", help="skip loading the result with transformers")
    args = parser.parse_args()
    tool_console()

    merges = read_merges(args.bpe)
    vocab = build_vocab(merges)
    for name, pad_token, pad_id in (("tokenizer", EOS_TOKEN, 49407), ("tokenizer_2", "!", 0)):
        folder = os.path.join(args.out, name)
        write_tokenizer_folder(folder, vocab, merges, pad_token)
        if not args.no_verify:
            verify_folder(folder, pad_id)


if __name__ == "__main__":
    run_cli(main)
