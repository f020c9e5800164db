"""SDXL prompt handling: offline tokenizers, prompt weighting, long prompts, conditioning, textual inversion.

SDXL conditions its U-Net on two CLIP text encoders:

* ``encoder_hidden_states`` (batch, 77 * k, hidden1 + hidden2): the penultimate hidden states of both
  encoders (``hidden_states[-2]``, without the final layer norm), concatenated on the channel axis;
* ``text_embeds`` / pooled (batch, projection_dim2): encoder 2's final-layer-normed hidden state at the
  end-of-text token of the first 77-token chunk, passed through ``text_projection``.

Tokenizers. The bundled ``library/sdxl/assets/tokenizer{,_2}`` folders hold CLIP's BPE vocabulary (built by
``tools/build_tokenizer_assets.py``). They load with ``transformers.CLIPTokenizer.from_pretrained``. In
transformers 5 there is only one CLIP tokenizer class, backed by the Rust ``tokenizers`` library
(``use_fast=False`` returns the same class). It is used because it loads offline from vocab.json + merges.txt
and gives the same ids as CLIP's reference tokenizer. It does not run ``ftfy``/``html.unescape`` as the
original CLIP code does, so :func:`clean_prompt_text` does the HTML unescape and whitespace cleanup here.
transformers also cuts every special token out of the text before BPE, including tokenizer 2's pad token
``!``; :func:`tokenize_prompt` therefore tokenizes prompt text with a copy that leaves ``!`` to BPE (see
``_text_backend``), so both tokenizers give CLIP's ids for text such as ``"wow!"``. Calling tokenizer 2
directly on text containing ``!`` gives different ids (``!`` -> 0 instead of e.g. ``!</w>`` -> 256).

Long prompts. A prompt's tokens (without bos/eos) are cut into chunks of 75. Each chunk becomes
``[bos] + tokens + [eos] + [pad] * (75 - len(tokens))`` and is encoded separately. ``max_embeddings_multiples``
(k) is the number of chunks: tokens beyond k * 75 are dropped, and missing chunks are empty ones
(``[bos, eos, pad...]``). Results are concatenated along the token axis, giving 77 * k tokens.

Prompt weighting. ``(word)`` multiplies the attention weight of its tokens by 1.1, ``((word))`` by 1.21,
``[word]`` divides by 1.1, ``(word:1.3)`` sets the factor to 1.3; brackets nest and multiply; ``\\(``, ``\\)``,
``\\[``, ``\\]`` and ``\\\\`` are literal characters. The hidden states of each encoder are multiplied per token
by these weights and then, per sample, rescaled so that their mean over tokens and channels equals the mean
before weighting (the usual "mean-preserving" weighting). All weights 1.0 leave the states untouched.
"""

from __future__ import annotations

import html
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from library.cli import Limit, Options, flag, option
from library.errors import UserError
from library.sdxl import CLIP_SKIP_MAX
from library.torch_modules import module_device

logger = logging.getLogger(__name__)

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUNDLED_TOKENIZER_DIRS = (os.path.join(ASSETS_DIR, "tokenizer"), os.path.join(ASSETS_DIR, "tokenizer_2"))

CHUNK_LENGTH = 77  # tokens per encoder call, including bos and eos
CHUNK_TOKENS = CHUNK_LENGTH - 2  # prompt tokens per chunk
ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1

# Attribute under which load_textual_inversion registers "name -> [name, name_1, ...]" on a tokenizer.
_TI_ATTR = "_lllite_textual_inversion"
_BACKEND_ATTR = "_lllite_text_backend"  # cached prompt-text tokenizer, see _text_backend
_truncation_warned = False


# --------------------------------------------------------------------------------------------- tokenizers


def _load_tokenizer_folder(folder: str) -> Any:
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a CLIP tokenizer from {folder!r} ({e}). Check the folder's files.") from e
    return tok


def load_sdxl_tokenizers(path: str | None = None) -> tuple[Any, Any]:
    """Load SDXL's two CLIP tokenizers without a network.

    Args:
        path: a diffusers model folder. When it has ``tokenizer`` and ``tokenizer_2`` subfolders these are
            used; otherwise (``None``, a single-file checkpoint, or a folder without them) the bundled
            ``library/sdxl/assets`` tokenizers are used.

    Returns:
        ``(tokenizer1, tokenizer2)``: tokenizer 1 pads with ``<|endoftext|>`` (49407), tokenizer 2 with ``!`` (0).
    """
    dirs = BUNDLED_TOKENIZER_DIRS
    if path is not None and os.path.isdir(path):
        candidates = (os.path.join(path, "tokenizer"), os.path.join(path, "tokenizer_2"))
        if all(os.path.isdir(c) for c in candidates):
            dirs = candidates
        else:
            logger.info("%s has no tokenizer/ and tokenizer_2/ folders: using the bundled SDXL tokenizers", path)
    for d in dirs:
        if not os.path.isdir(d):
            raise UserError(
                f"tokenizer folder {d!r} is missing. Rebuild the bundled assets with "
                "`python tools/build_tokenizer_assets.py --bpe bpe_simple_vocab_16e6.txt.gz`."
            )
    tok1, tok2 = (_load_tokenizer_folder(d) for d in dirs)
    logger.info("loaded tokenizers from %s and %s", dirs[0], dirs[1])
    return tok1, tok2


def tokenizers_via_cache_dir(cache_dir: str) -> tuple[Any, Any]:
    """The tokenizer cache folder: the tokenizers saved in ``cache_dir``, which is filled first when empty.

    sd-scripts downloads the tokenizers into this folder once and reads them from it afterwards, so
    an offline machine can be given a copied folder. Here the bundled tokenizers are what gets
    written, and a folder that already holds ``tokenizer``/``tokenizer_2`` is what gets used.
    """
    folders = (os.path.join(cache_dir, "tokenizer"), os.path.join(cache_dir, "tokenizer_2"))
    if not all(os.path.isdir(f) for f in folders):
        try:
            for src, dst in zip(load_sdxl_tokenizers(None), folders):
                _save_folder_atomically(src, dst)
        except OSError as e:
            raise UserError(f"tokenizer cache folder {cache_dir}: cannot write the tokenizers there ({e})") from None
        logger.info("wrote the SDXL tokenizers to %s", cache_dir)
    return load_sdxl_tokenizers(cache_dir)


def _save_folder_atomically(tokenizer: Any, folder: str) -> None:
    """Save into a temporary folder renamed into place: an interrupted write never leaves half a tokenizer,
    and when several processes race, the first complete folder stays."""
    import shutil
    import tempfile

    from library.atomic_io import set_plain_modes

    if os.path.isdir(folder):
        return
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=os.path.dirname(folder) or ".")
    try:
        tokenizer.save_pretrained(tmp)
        set_plain_modes(tmp)  # mkdtemp's 0700 would hide the folder from other users
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isdir(folder):  # not another process's folder that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_prompt_text(text: str) -> str:
    """CLIP's text cleanup that the transformers tokenizer leaves out: HTML unescape (twice) and whitespace.

    Lowercasing and NFC normalisation are done by the tokenizer itself.
    """
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text)


# ----------------------------------------------------------------------------------------- prompt weights

_WEIGHT_RE = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_ESCAPABLE = "()[]\\"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces following the usual emphasis syntax.

    ``(a)`` -> 1.1, ``((a))`` -> 1.21, ``[a]`` -> 1/1.1, ``(a:1.5)`` -> 1.5, nested brackets multiply,
    ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal. An unmatched closing bracket is kept as text; brackets
    left open at the end still apply their factor to everything after them. Neighbouring pieces with equal
    weights are merged; an empty prompt gives ``[("", 1.0)]``.

    Examples:
        >>> parse_prompt_attention("a (red:1.5) [cat]")
        [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    pieces: list[list[Any]] = []  # [text, weight]
    buf: list[str] = []
    round_open: list[int] = []  # indices into pieces where each open bracket starts
    square_open: list[int] = []

    def flush() -> None:
        if buf:
            pieces.append(["".join(buf), 1.0])
            buf.clear()

    def scale(start: int, factor: float) -> None:
        for p in pieces[start:]:
            p[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            buf.append(text[i + 1])
            i += 2
            continue
        if c == "(":
            flush()
            round_open.append(len(pieces))
        elif c == "[":
            flush()
            square_open.append(len(pieces))
        elif c == ")" and round_open:
            flush()
            scale(round_open.pop(), ROUND_BRACKET_FACTOR)
        elif c == "]" and square_open:
            flush()
            scale(square_open.pop(), SQUARE_BRACKET_FACTOR)
        elif c == ":" and round_open and (m := _WEIGHT_RE.match(text, i)):
            flush()
            scale(round_open.pop(), float(m.group(1)))
            i = m.end()
            continue
        else:
            buf.append(c)
        i += 1
    flush()
    for start in reversed(round_open):
        scale(start, ROUND_BRACKET_FACTOR)
    for start in reversed(square_open):
        scale(start, SQUARE_BRACKET_FACTOR)

    merged: list[tuple[str, float]] = []
    for t, w in pieces:
        if not t:
            continue
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    return merged or [("", 1.0)]


# ----------------------------------------------------------------------------------------- tokenization


def _expansions_for(tokenizer: Any, extra: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    found = dict(getattr(tokenizer, _TI_ATTR, None) or {})
    if extra:
        found.update({k: list(v) for k, v in extra.items()})
    return {k: v for k, v in found.items() if len(v) > 1}


def _expand_textual_inversion(text: str, expansions: Mapping[str, Sequence[str]]) -> str:
    """Replace each whole-word ``name`` of a multi-vector embedding with ``name name_1 ... name_{n-1}``."""
    for name, tokens in expansions.items():
        pattern = re.compile(r"(?<![\w])" + re.escape(name) + r"(?![\w])", re.IGNORECASE)
        text = pattern.sub(lambda _m, toks=tokens: " ".join(toks), text)
    return text


def _text_backend(tokenizer: Any) -> Any | None:
    """A Rust ``tokenizers.Tokenizer`` for prompt text that does not split out ordinary tokens used as specials.

    transformers registers every special token as an "added token", and added tokens are cut out of the text
    before BPE. For tokenizer 2 the pad token is ``!`` (id 0), so ``"hi!"`` would become ``hi</w> !`` (id 0)
    instead of CLIP's ``hi</w> !</w>`` (id 256), and ``"!!!"`` three ids 0 instead of one merged token.
    SDXL's encoder 2 was trained with the plain CLIP tokenizer, so this copy shares the BPE model, normaliser
    and pre-tokeniser but drops added tokens that are regular BPE vocabulary entries (bos/eos and
    textual-inversion tokens are kept). A copy is used for tokenizer 1 too: the transformers wrapper leaves
    truncation settings from earlier calls on its backend, and the copy has none. It is cached on the
    tokenizer and rebuilt when its added tokens change. Returns None for a tokenizer without a Rust backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    keep_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    drop = {i for i, a in added.items() if i not in keep_ids and backend.model.token_to_id(a.content) == i}
    key = tuple(sorted((i, a.content) for i, a in added.items()))
    cached = getattr(tokenizer, _BACKEND_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    from tokenizers import Tokenizer

    text_backend = Tokenizer(backend.model)
    text_backend.normalizer = backend.normalizer
    text_backend.pre_tokenizer = backend.pre_tokenizer
    for i in sorted(added):  # ids of tokens outside the model vocabulary are assigned in order
        if i in drop:
            continue
        a = added[i]
        (text_backend.add_special_tokens if a.special else text_backend.add_tokens)([a])
        if text_backend.token_to_id(a.content) != i:
            logger.warning("cannot rebuild the prompt tokenizer (token %r): '!' may tokenize differently", a.content)
            return None
    setattr(tokenizer, _BACKEND_ATTR, (key, text_backend))
    return text_backend


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = _text_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def tokenize_prompt(
    tokenizer: Any,
    prompt: str,
    max_embeddings_multiples: int = 1,
    use_weighting: bool = True,
    *,
    textual_inversion: Mapping[str, Sequence[str]] | None = None,
) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Tokenize one prompt into ``k = max_embeddings_multiples`` chunks of 77 tokens.

    Each chunk is ``[bos] + up to 75 tokens + [eos]`` padded with the tokenizer's pad id; tokens beyond
    ``75 * k`` are dropped and missing chunks are empty (``[bos, eos, pad...]``).

    Args:
        tokenizer: a CLIP tokenizer (see :func:`load_sdxl_tokenizers`).
        prompt: the prompt text.
        max_embeddings_multiples: number of 77-token chunks k (>= 1).
        use_weighting: parse the emphasis syntax (see :func:`parse_prompt_attention`); when False the text is
            tokenized as it is and every weight is 1.0.
        textual_inversion: extra ``name -> [name, name_1, ...]`` expansions; those registered by
            :func:`load_textual_inversion` on this tokenizer are always applied.

    Returns:
        ``(ids, weights)``: a LongTensor and a FloatTensor of shape ``[77 * k]``; bos/eos/pad weigh 1.0.
    """
    global _truncation_warned
    if max_embeddings_multiples < 1:
        raise UserError(f"max_embeddings_multiples must be at least 1, got {max_embeddings_multiples}.")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos

    pieces = parse_prompt_attention(prompt) if use_weighting else [(prompt, 1.0)]
    expansions = _expansions_for(tokenizer, textual_inversion)
    texts = [clean_prompt_text(_expand_textual_inversion(t, expansions)) for t, _ in pieces]
    encoded = _encode_texts(tokenizer, texts)
    ids: list[int] = []
    weights: list[float] = []
    for piece_ids, (_, w) in zip(encoded, pieces):
        ids.extend(piece_ids)
        weights.extend([float(w)] * len(piece_ids))

    capacity = CHUNK_TOKENS * max_embeddings_multiples
    if len(ids) > capacity:
        level = logging.DEBUG if _truncation_warned else logging.WARNING
        _truncation_warned = True
        logger.log(
            level,
            "prompt has %d tokens, more than %d (max_embeddings_multiples=%d): the rest is ignored: %r",
            len(ids), capacity, max_embeddings_multiples, prompt[:80],
        )
        ids, weights = ids[:capacity], weights[:capacity]

    out_ids: list[int] = []
    out_w: list[float] = []
    for c in range(max_embeddings_multiples):
        part = ids[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS]
        part_w = weights[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS]
        fill = CHUNK_TOKENS - len(part)
        out_ids += [bos] + part + [eos] + [pad] * fill
        out_w += [1.0] + part_w + [1.0] + [1.0] * fill
    return torch.tensor(out_ids, dtype=torch.long), torch.tensor(out_w, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- encoding


def _select_layer(hidden_states: Sequence[torch.Tensor], clip_skip: int, which: str) -> torch.Tensor:
    layers = len(hidden_states) - 1  # hidden_states[0] is the embedding output
    if not 1 <= clip_skip <= layers:
        raise UserError(f"clip_skip={clip_skip} is out of range for {which} with {layers} layers (use 1..{layers}).")
    return hidden_states[-clip_skip]


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply ``hidden`` [b, t, c] per token by ``weights`` [b, t], then restore each sample's mean."""
    h = hidden.float()
    w = weights.to(device=h.device, dtype=torch.float32)
    before = h.mean(dim=(1, 2))
    h = h * w.unsqueeze(-1)
    after = h.mean(dim=(1, 2))
    # A (near) zero mean cannot be rescaled meaningfully: keep the plain weighted states then.
    ratio = torch.where(after.abs() > 1e-12, before / after, torch.ones_like(after))
    h = h * ratio.view(-1, 1, 1)
    return h.to(hidden.dtype)


def _eos_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first eos token in each row (rows built by tokenize_prompt always contain one)."""
    return (ids == eos_id).int().argmax(dim=-1)


def encode_prompts(
    text_encoder1: torch.nn.Module,
    text_encoder2: torch.nn.Module,
    tokenizer1: Any,
    tokenizer2: Any,
    prompts: list[str],
    *,
    max_embeddings_multiples: int = 1,
    clip_skip: int | None = None,
    use_weighting: bool = False,
    textual_inversion: Mapping[str, Sequence[str]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts into SDXL conditioning.

    Args:
        text_encoder1: ``CLIPTextModel`` (CLIP ViT-L text encoder in SDXL).
        text_encoder2: ``CLIPTextModelWithProjection`` (OpenCLIP bigG text encoder in SDXL).
        tokenizer1, tokenizer2: the matching tokenizers (see :func:`load_sdxl_tokenizers`).
        prompts: the batch of prompts.
        max_embeddings_multiples: number k of 77-token chunks; prompts longer than 75 * k tokens are cut.
        clip_skip: which hidden state to use, counted from the end: ``None`` or 2 is SDXL's penultimate
            layer (``hidden_states[-2]``), N takes ``hidden_states[-N]`` (1 = last layer output, still
            without the final layer norm). Applies to both encoders; the pooled output is unaffected.
        use_weighting: apply the ``(word:1.2)`` emphasis syntax (mean-preserving, see the module docstring).
        textual_inversion: extra ``name -> [name, name_1, ...]`` expansions (those registered by
            :func:`load_textual_inversion` are applied anyway).

    Returns:
        ``(hidden, pooled)``: hidden ``[b, 77 * k, hidden1 + hidden2]`` and pooled ``[b, projection_dim2]``,
        on encoder 1's device, in the wider of the two encoders' dtypes. The pooled output is taken at the
        eos token of the first chunk, found by the eos id (not by the largest id, which would pick a
        textual-inversion token), so it does not depend on the encoder config's ``eos_token_id``.
        Runs under ``torch.no_grad`` (the encoders are frozen).
    """
    if not prompts:
        raise UserError("encode_prompts needs at least one prompt.")
    skip = 2 if clip_skip is None else int(clip_skip)
    k = max_embeddings_multiples
    projection = getattr(text_encoder2, "text_projection", None)
    if projection is None:
        raise UserError("text_encoder2 has no text_projection: it must be a CLIPTextModelWithProjection.")

    results: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    with torch.no_grad():
        for index, (encoder, tokenizer) in enumerate(((text_encoder1, tokenizer1), (text_encoder2, tokenizer2))):
            device = module_device(encoder)
            tokens = [
                tokenize_prompt(tokenizer, p, k, use_weighting, textual_inversion=textual_inversion) for p in prompts
            ]
            ids = torch.stack([t[0] for t in tokens]).to(device)  # [b, 77k]
            weights = torch.stack([t[1] for t in tokens])
            b = ids.shape[0]
            chunk_ids = ids.view(b * k, CHUNK_LENGTH)
            out = encoder(input_ids=chunk_ids, output_hidden_states=True)
            hidden = _select_layer(out.hidden_states, skip, f"text encoder {index + 1}")
            hidden = hidden.reshape(b, k * CHUNK_LENGTH, hidden.shape[-1])
            if use_weighting and not torch.all(weights == 1.0):
                hidden = _apply_weights(hidden, weights)
            results.append(hidden)
            if index == 1:
                # last_hidden_state already has the final layer norm; pick the first chunk's eos token.
                first = out.last_hidden_state.view(b, k, CHUNK_LENGTH, -1)[:, 0]
                pos = _eos_positions(chunk_ids.view(b, k, CHUNK_LENGTH)[:, 0], tokenizer.eos_token_id)
                pooled = projection(first[torch.arange(b, device=first.device), pos])

    assert pooled is not None
    out_device = results[0].device
    dtype = torch.promote_types(results[0].dtype, results[1].dtype)
    hidden = torch.cat([r.to(out_device, dtype) for r in results], dim=-1)
    return hidden, pooled.to(out_device, dtype)


# ----------------------------------------------------------------------------------------- textual inversion


def _encoder_width(encoder: torch.nn.Module) -> int:
    return int(encoder.get_input_embeddings().weight.shape[1])


def _load_embedding_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file: safetensors, or (any other extension, as sd-scripts) a torch file."""
    import safetensors
    from safetensors.torch import load_file

    if path.lower().endswith(".safetensors"):
        try:
            return load_file(path)
        except (getattr(safetensors, "SafetensorError", OSError), OSError, ValueError) as e:
            raise UserError(f"cannot read textual inversion {path!r} as safetensors ({e}).") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs from the file
    except Exception as e:  # torch.load raises pickle, zip and runtime errors alike for a file it cannot read
        raise UserError(f"cannot read textual inversion {path!r} as a torch file ({str(e).splitlines()[0]}); "
                        "give an SDXL embedding (.safetensors, or a .pt/.bin with clip_l and clip_g)") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"textual inversion {path!r} holds {type(data).__name__}, not named tensors; an SDXL "
                        "embedding has 'clip_l' [n, 768] and 'clip_g' [n, 1280]. SD 1.x/2.x embeddings cannot be used "
                        "with SDXL.")
    return data


def _read_embedding(path: str, text_encoder1: torch.nn.Module, text_encoder2: torch.nn.Module) -> list[torch.Tensor]:
    """The ``clip_l`` and ``clip_g`` vectors of an SDXL embedding file, checked against the encoders."""
    if not os.path.isfile(path):
        raise UserError(f"textual inversion file not found: {path!r}.")
    tensors = _load_embedding_file(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if "clip_l" not in tensors or "clip_g" not in tensors:
        raise UserError(
            f"textual inversion {path!r} has keys {shapes}; an SDXL embedding needs 'clip_l' [n, 768] and "
            "'clip_g' [n, 1280]. SD 1.x/2.x embeddings cannot be used with SDXL."
        )
    vectors = []
    targets = (("clip_l", text_encoder1, "text encoder 1"), ("clip_g", text_encoder2, "text encoder 2"))
    for key, encoder, which in targets:
        v = tensors[key]
        if v.dim() == 1:
            v = v.unsqueeze(0)
        width = _encoder_width(encoder)
        if v.dim() != 2 or v.shape[1] != width or v.shape[0] < 1:
            raise UserError(
                f"textual inversion {path!r}: {key!r} has shape {tuple(tensors[key].shape)} but {which} needs "
                f"[n, {width}] (file keys/shapes: {shapes}). Is it an embedding for this model?"
            )
        vectors.append(v)
    if vectors[0].shape[0] != vectors[1].shape[0]:
        raise UserError(
            f"textual inversion {path!r}: clip_l has {vectors[0].shape[0]} vectors but clip_g has "
            f"{vectors[1].shape[0]} (shapes: {shapes}); they must match."
        )
    return vectors


def _check_new_tokens(names: list[str], path: str, tokenizers: tuple[Any, Any]) -> None:
    for tokenizer in tokenizers:
        vocab = tokenizer.get_vocab()
        added = tokenizer.get_added_vocab()
        for t in names:
            # Added tokens match lowercased text, so a name that is (in lower case) an existing BPE token
            # would either reuse that token's id or hijack it in every prompt.
            if t not in added and (t in vocab or t.lower() in vocab):
                raise UserError(
                    f"textual inversion token {t!r} (from {path!r}) is already a token of the CLIP vocabulary "
                    f"({t.lower()!r}); choose another token name (rename the file or pass a token name)."
                )


def load_textual_inversion(
    path: str,
    tokenizer1: Any,
    tokenizer2: Any,
    text_encoder1: torch.nn.Module,
    text_encoder2: torch.nn.Module,
    token: str | None = None,
) -> list[str]:
    """Load an SDXL textual-inversion embedding and make its token usable in prompts.

    The file is a safetensors file with ``clip_l`` ``[n, width1]`` and ``clip_g`` ``[n, width2]`` tensors
    (768 and 1280 for SDXL). ``n`` tokens ``name, name_1, ..., name_{n-1}`` are added to both tokenizers
    (``name`` is ``token`` or the file stem), both encoders' embedding tables are resized and the rows set to
    the vectors. Afterwards a prompt containing ``name`` (a whole word, any case) expands to all n tokens.
    Loading the same name again replaces its vectors.

    Returns:
        The added token strings, in order.

    Raises:
        UserError: unreadable file, wrong keys, widths that do not match the encoders, different vector
            counts, or a name that already is a token of the CLIP vocabulary.
    """
    vectors = _read_embedding(path, text_encoder1, text_encoder2)
    name = token or os.path.splitext(os.path.basename(path))[0]
    if not name or re.search(r"\s", name):
        raise UserError(f"textual inversion token name {name!r} (from {path!r}) must be non-empty without spaces.")
    count = vectors[0].shape[0]
    names = [name] + [f"{name}_{i}" for i in range(1, count)]

    _check_new_tokens(names, path, (tokenizer1, tokenizer2))  # both before changing either
    for tokenizer, encoder, v in ((tokenizer1, text_encoder1, vectors[0]), (tokenizer2, text_encoder2, vectors[1])):
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        embeddings = encoder.get_input_embeddings()
        if embeddings.weight.shape[0] < len(tokenizer):
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embeddings = encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[ids] = v.to(embeddings.weight.device, embeddings.weight.dtype)
        registry = dict(getattr(tokenizer, _TI_ATTR, None) or {})
        registry[name] = names
        setattr(tokenizer, _TI_ATTR, registry)
    logger.info("loaded textual inversion %s: %d token(s) %s", path, count, ", ".join(names))
    return names


# ----------------------------------------------------------------------------------------- training captions

MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextEncodingOptions(Options):
    """How training captions become text-encoder outputs (``encode_prompts`` arguments).

    The training script's options; the generation script has its own.
    """

    group = "captions: text encoding"

    max_token_length: int = option(
        type=int, held=75,
        help="caption tokens seen by both text encoders: 75 (the default), 150 or 225. Longer captions are "
             "cut; 150/225 encode 2/3 chunks of 75 tokens, as sdxl_gen_img.py's max_embeddings_multiples 2/3 "
             "does, so generate with the same length")
    clip_skip: int | None = option(
        type=int, limit=Limit(1, CLIP_SKIP_MAX), what="1 = last layer, 2 = SDXL's usual penultimate layer",
        help="which hidden state of both text encoders conditions the U-Net, counted from the end, exactly as "
             "sdxl_gen_img.py --clip_skip: 2 (the default) is SDXL's penultimate layer, 1 the last layer, "
             "N >= 1. Differs from sd-scripts, which ignores clip_skip in SDXL training (with a warning); "
             "generate with the same value")
    weighted_captions: bool = flag(
        help="read the emphasis syntax in training captions as sdxl_gen_img.py does in prompts: (word) x1.1, "
             "[word] /1.1, (word:1.3), nested brackets multiply, mean-preserving. Without it brackets are "
             "plain text. Keep commas out of brackets: shuffle and tag dropout split tags at the separator")

    @classmethod
    def settle(cls, v: dict, args: Any) -> dict:
        length = 75 if v["max_token_length"] is None else v["max_token_length"]
        if length not in MAX_TOKEN_LENGTHS:
            raise UserError(f"--max_token_length {length} is not one of {', '.join(map(str, MAX_TOKEN_LENGTHS))} "
                            "(tokens per caption: 1, 2 or 3 chunks of 75)")
        return {**v, "max_token_length": length, "weighted_captions": bool(v["weighted_captions"])}

    @property
    def max_embeddings_multiples(self) -> int:
        """Chunks of 75 tokens: what sdxl_gen_img.py's max_embeddings_multiples calls the length."""
        return self.max_token_length // CHUNK_TOKENS

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``encode_prompts`` for these options."""
        return {"max_embeddings_multiples": self.max_embeddings_multiples, "clip_skip": self.clip_skip,
                "use_weighting": self.weighted_captions}

    def cache_id(self) -> str:
        """Everything here the encoder outputs depend on, for text-encoder cache ids (defaults spelled out)."""
        skip = 2 if self.clip_skip is None else self.clip_skip
        return f"tokens={self.max_token_length};clip_skip={skip};weighted={int(self.weighted_captions)}"
