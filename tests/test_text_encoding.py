"""Tests for library/sdxl/text_encoding.py and the bundled tokenizer assets (CPU, tiny random encoders)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.sdxl.text_encoding import (
    BUNDLED_TOKENIZER_DIRS,
    encode_prompts,
    load_sdxl_tokenizers,
    load_textual_inversion,
    parse_prompt_attention,
    tokenize_prompt,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizers():
    return load_sdxl_tokenizers()


def _tiny_encoders(eos_token_id: int = 49407, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    common = dict(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=layers, num_attention_heads=2,
                  eos_token_id=eos_token_id)
    e1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **common)).eval()
    e2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=40, **common)
    ).eval()
    return e1, e2


@pytest.fixture(scope="module")
def encoders():
    return _tiny_encoders()


# ----------------------------------------------------------------------------------------- tokenizers


def test_bundled_assets_are_complete():
    for folder in BUNDLED_TOKENIZER_DIRS:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert os.path.isfile(os.path.join(folder, name)), (folder, name)
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        assert len(vocab) == 49408
        assert vocab["!"] == 0 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


def test_reference_ids_and_padding(tokenizers):
    tok1, tok2 = tokenizers
    for tok in (tok1, tok2):
        assert tok("a photo of a cat").input_ids == CAT_IDS
        assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (BOS, EOS, 77)
        # lowercase + whitespace cleanup
        assert tok("A  Photo\tOF a CAT").input_ids == CAT_IDS
    assert tok1.pad_token_id == EOS and tok2.pad_token_id == 0
    p1 = tok1("a photo of a cat", padding="max_length", max_length=77).input_ids
    p2 = tok2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert p1 == CAT_IDS + [EOS] * 70
    assert p2 == CAT_IDS + [0] * 70


def _reference_bpe_ids(word_list, folder):
    """CLIP's BPE done by hand from merges.txt, as an independent check of the tokenizer."""
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        ranks = {tuple(line.split()): i for i, line in enumerate(f.read().splitlines()[1:])}
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    out = []
    for word in word_list:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(vocab[p] for p in parts)
    return out


def test_tokenizer_matches_hand_bpe(tokenizers):
    words = ["masterpiece", "highly", "detailed", "photograph", "unbelievably", "zyxwvut", "cat", "a"]
    got = tokenizers[1](" ".join(words), add_special_tokens=False).input_ids
    assert got == _reference_bpe_ids(words, BUNDLED_TOKENIZER_DIRS[1])


def test_exclamation_mark_is_not_split_as_pad(tokenizers):
    """Tokenizer 2's pad "!" is a special token in transformers and would be cut out of the text."""
    tok1, tok2 = tokenizers
    text = "wow!!! hi!"
    assert tok2(text, add_special_tokens=False).input_ids != tok1(text, add_special_tokens=False).input_ids
    ref = tok1(text, add_special_tokens=False).input_ids  # tokenizer 1 has no '!' special token
    assert 0 not in ref
    ids1, _ = tokenize_prompt(tok1, text)
    ids2, _ = tokenize_prompt(tok2, text)
    n = len(ref) + 2
    assert ids1[:n].tolist() == ids2[:n].tolist() == [BOS] + ref + [EOS]
    assert ids2[n:].eq(0).all() and ids1[n:].eq(EOS).all()


def test_load_from_diffusers_folder_and_fallback(tmp_path, tokenizers):
    # a folder without tokenizer subfolders falls back to the bundled assets
    t1, t2 = load_sdxl_tokenizers(str(tmp_path))
    assert t2.pad_token_id == 0
    # a diffusers-style folder is used when present (here: a copy with tokenizer 2 padding with eos)
    for sub, src in zip(("tokenizer", "tokenizer_2"), (BUNDLED_TOKENIZER_DIRS[0], BUNDLED_TOKENIZER_DIRS[0])):
        os.makedirs(tmp_path / sub)
        for name in os.listdir(src):
            with open(os.path.join(src, name), "rb") as f, open(tmp_path / sub / name, "wb") as g:
                g.write(f.read())
    t1, t2 = load_sdxl_tokenizers(str(tmp_path))
    assert t2.pad_token_id == EOS


# ----------------------------------------------------------------------------------------- weighting parser


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("", [("", 1.0)]),
        ("a (cat:1.2) dog", [("a ", 1.0), ("cat", 1.2), (" dog", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("[[cat]]", [("cat", 1 / 1.21)]),
        ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.65), (" c", 1.1)]),
        ("(red [cat])", [("red ", 1.1), ("cat", 1.0)]),
        (r"pikachu \(pokemon\)", [("pikachu (pokemon)", 1.0)]),
        (r"\[x\] \\", [("[x] \\", 1.0)]),
        ("(cat: 0.5 )", [("cat", 0.5)]),
        ("a:b (c:d)", [("a:b ", 1.0), ("c:d", 1.1)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("(open", [("open", 1.1)]),
    ],
)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# ----------------------------------------------------------------------------------------- tokenize_prompt


def test_tokenize_prompt_weights(tokenizers):
    tok1, tok2 = tokenizers
    ids, w = tokenize_prompt(tok2, "a photo of a (cat:1.5)")
    assert ids.dtype == torch.long and w.dtype == torch.float32 and ids.shape == w.shape == (77,)
    assert ids[:7].tolist() == CAT_IDS and ids[7:].eq(0).all()
    assert w[5].item() == pytest.approx(1.5) and w[:5].eq(1).all() and w[6:].eq(1).all()
    plain_ids, plain_w = tokenize_prompt(tok1, "a photo of a cat", use_weighting=False)
    assert plain_ids[:7].tolist() == CAT_IDS and plain_w.eq(1).all()


def test_long_prompt_chunking(tokenizers):
    tok1, tok2 = tokenizers
    prompt = " ".join(["cat"] * 100)  # "cat" is one token
    for tok, pad in ((tok1, EOS), (tok2, 0)):
        tok("a b c d e f g", truncation=True, max_length=4)  # must not leave truncation behind
        ids, w = tokenize_prompt(tok, prompt, max_embeddings_multiples=2)
        assert ids.shape == w.shape == (154,)
        c1, c2 = ids[:77].tolist(), ids[77:].tolist()
        assert c1 == [BOS] + [2368] * 75 + [EOS]
        assert c2 == [BOS] + [2368] * 25 + [EOS] + [pad] * 50
        # truncated to one chunk
        ids1, _ = tokenize_prompt(tok, prompt, max_embeddings_multiples=1)
        assert ids1.tolist() == c1
        # a short prompt gets an empty second chunk
        ids_s, _ = tokenize_prompt(tok, "a photo of a cat", max_embeddings_multiples=2)
        assert ids_s[77:].tolist() == [BOS, EOS] + [pad] * 75


# ----------------------------------------------------------------------------------------- encode_prompts


def test_encode_prompts_shapes_and_layers(tokenizers, encoders):
    tok1, tok2 = tokenizers
    e1, e2 = encoders
    prompts = ["a photo of a cat", "a dog"]
    hidden, pooled = encode_prompts(e1, e2, tok1, tok2, prompts)
    assert hidden.shape == (2, 77, 80) and pooled.shape == (2, 40)
    assert not hidden.requires_grad

    ids1 = torch.stack([tokenize_prompt(tok1, p)[0] for p in prompts])
    ids2 = torch.stack([tokenize_prompt(tok2, p)[0] for p in prompts])
    with torch.no_grad():
        o1 = e1(ids1, output_hidden_states=True)
        o2 = e2(ids2, output_hidden_states=True)
    torch.testing.assert_close(hidden[..., :32], o1.hidden_states[-2])
    torch.testing.assert_close(hidden[..., 32:], o2.hidden_states[-2])
    # the penultimate layer is not the final (layer-normed) output
    assert not torch.allclose(hidden[..., 32:], o2.last_hidden_state)
    # pooled: encoder 2's projection of the final-normed state at the eos position (6 and 3)
    eos_pos = [6, 3]
    want = e2.text_projection(o2.last_hidden_state[torch.arange(2), eos_pos]).detach()
    torch.testing.assert_close(pooled, want)
    torch.testing.assert_close(pooled, o2.text_embeds)  # eos_token_id=49407 config: transformers agrees

    h1, _ = encode_prompts(e1, e2, tok1, tok2, prompts, clip_skip=1)
    torch.testing.assert_close(h1[..., :32], o1.hidden_states[-1])
    with pytest.raises(UserError, match="clip_skip=3"):
        encode_prompts(e1, e2, tok1, tok2, prompts, clip_skip=3)  # only 2 layers


def test_clip_skip_deeper(tokenizers):
    tok1, tok2 = tokenizers
    e1, e2 = _tiny_encoders(layers=4, seed=3)
    ids1 = tokenize_prompt(tok1, "a cat")[0][None]
    ids2 = tokenize_prompt(tok2, "a cat")[0][None]
    with torch.no_grad():
        o1 = e1(ids1, output_hidden_states=True)
        o2 = e2(ids2, output_hidden_states=True)
    h2, _ = encode_prompts(e1, e2, tok1, tok2, ["a cat"], clip_skip=None)
    h3, _ = encode_prompts(e1, e2, tok1, tok2, ["a cat"], clip_skip=3)
    torch.testing.assert_close(h2, torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1))
    torch.testing.assert_close(h3, torch.cat([o1.hidden_states[-3], o2.hidden_states[-3]], -1))


def test_pooled_uses_eos_not_largest_id(tokenizers, tmp_path):
    """With a legacy config (eos_token_id=2) transformers pools at argmax(ids); a textual-inversion token has a
    larger id than eos, so that would be the wrong position. encode_prompts must pool at the real eos."""
    tok1, tok2 = load_sdxl_tokenizers()
    e1, e2 = _tiny_encoders(eos_token_id=2, seed=1)
    path = tmp_path / "myemb_x.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}, str(path))
    load_textual_inversion(str(path), tok1, tok2, e1, e2)
    _, pooled = encode_prompts(e1, e2, tok1, tok2, ["a myemb_x cat"])
    ids2 = tokenize_prompt(tok2, "a myemb_x cat")[0][None]
    assert ids2[0, :5].tolist() == [BOS, 320, 49408, 2368, EOS]
    with torch.no_grad():
        o2 = e2(ids2, output_hidden_states=True)
    want = e2.text_projection(o2.last_hidden_state[:, 4])
    torch.testing.assert_close(pooled, want)
    assert not torch.allclose(pooled, o2.text_embeds)  # transformers picked the TI token (id 49408)


def test_long_prompt_encoding(tokenizers, encoders):
    tok1, tok2 = tokenizers
    e1, e2 = encoders
    prompt = " ".join(["cat"] * 100)
    hidden, pooled = encode_prompts(e1, e2, tok1, tok2, [prompt], max_embeddings_multiples=2)
    assert hidden.shape == (1, 154, 80)
    ids2 = tokenize_prompt(tok2, prompt, 2)[0].view(2, 77)
    with torch.no_grad():
        o2 = e2(ids2, output_hidden_states=True)
    torch.testing.assert_close(hidden[0, 77:, 32:], o2.hidden_states[-2][1])
    torch.testing.assert_close(pooled[0], o2.text_embeds[0])  # first chunk's eos


def test_weighting(tokenizers, encoders):
    tok1, tok2 = tokenizers
    e1, e2 = encoders
    prompts = ["a photo of a cat"]
    base, pooled = encode_prompts(e1, e2, tok1, tok2, prompts)
    ones, pooled_w = encode_prompts(e1, e2, tok1, tok2, prompts, use_weighting=True)
    torch.testing.assert_close(ones, base)
    torch.testing.assert_close(pooled_w, pooled)
    weighted, _ = encode_prompts(e1, e2, tok1, tok2, ["a photo of a (cat:1.5)"], use_weighting=True)
    assert not torch.allclose(weighted, base)
    # mean preserved per encoder
    for sl in (slice(0, 32), slice(32, 80)):
        torch.testing.assert_close(weighted[..., sl].mean(), base[..., sl].mean(), rtol=1e-4, atol=1e-5)
    # relative to the other tokens, the weighted token is 1.5 times as strong
    ratio = weighted[0, 5, :32] / base[0, 5, :32]
    other = weighted[0, 2, :32] / base[0, 2, :32]
    torch.testing.assert_close(ratio / other, torch.full_like(ratio, 1.5))


# ----------------------------------------------------------------------------------------- textual inversion


def test_textual_inversion_round_trip(tmp_path):
    tok1, tok2 = load_sdxl_tokenizers()
    e1, e2 = _tiny_encoders(seed=2)
    prompt = "a photo of MyStyle cat"
    before, _ = encode_prompts(e1, e2, tok1, tok2, [prompt])

    path = tmp_path / "MyStyle.safetensors"
    vec_l, vec_g = torch.randn(3, 32), torch.randn(3, 48)
    save_file({"clip_l": vec_l, "clip_g": vec_g}, str(path))
    names = load_textual_inversion(str(path), tok1, tok2, e1, e2)
    assert names == ["MyStyle", "MyStyle_1", "MyStyle_2"]
    assert e1.get_input_embeddings().weight.shape[0] == 49411
    assert e2.get_input_embeddings().weight.shape[0] == 49411
    ids, _ = tokenize_prompt(tok1, prompt)
    assert ids[:9].tolist() == [BOS, 320, 1125, 539, 49408, 49409, 49410, 2368, EOS]
    ids_lower, _ = tokenize_prompt(tok2, "a photo of mystyle cat")
    assert ids_lower[:9].tolist() == ids[:9].tolist()
    after, _ = encode_prompts(e1, e2, tok1, tok2, [prompt])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(e1.get_input_embeddings().weight[49408:49411].detach(), vec_l)
    torch.testing.assert_close(e2.get_input_embeddings().weight[49408:49411].detach(), vec_g)
    # prompts without the token are unchanged
    a, _ = encode_prompts(e1, e2, tok1, tok2, ["a dog"])
    e1b, e2b = _tiny_encoders(seed=2)
    b, _ = encode_prompts(e1b, e2b, tok1, tok2, ["a dog"])
    torch.testing.assert_close(a, b)


def test_textual_inversion_errors(tmp_path):
    tok1, tok2 = load_sdxl_tokenizers()
    e1, e2 = _tiny_encoders()
    wrong_width = tmp_path / "bad.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(wrong_width))
    with pytest.raises(UserError, match=r"bad\.safetensors.*clip_l.*\(2, 768\)"):
        load_textual_inversion(str(wrong_width), tok1, tok2, e1, e2)
    wrong_keys = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(wrong_keys))
    with pytest.raises(UserError, match=r"sd15\.safetensors.*emb_params"):
        load_textual_inversion(str(wrong_keys), tok1, tok2, e1, e2)
    ok = tmp_path / "x.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}, str(ok))
    with pytest.raises(UserError, match="already a token"):
        load_textual_inversion(str(ok), tok1, tok2, e1, e2, token="Cat")
    assert len(tok1) == 49408  # nothing added on failure


def test_textual_inversion_from_a_torch_file(tmp_path):
    """sd-scripts reads any embedding that is not .safetensors with torch.load: a .pt with clip_l/clip_g loads."""
    tok1, tok2 = load_sdxl_tokenizers()
    e1, e2 = _tiny_encoders()
    vec_l, vec_g = torch.randn(2, 32), torch.randn(2, 48)
    torch.save({"clip_l": vec_l, "clip_g": vec_g}, tmp_path / "PtStyle.pt")
    assert load_textual_inversion(str(tmp_path / "PtStyle.pt"), tok1, tok2, e1, e2) == ["PtStyle", "PtStyle_1"]
    torch.testing.assert_close(e2.get_input_embeddings().weight[-2:].detach(), vec_g)
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, tmp_path / "sd15.pt")  # an SD 1.x embedding
    with pytest.raises(UserError, match=r"sd15\.pt.*not named tensors.*SD 1\.x/2\.x embeddings cannot be used"):
        load_textual_inversion(str(tmp_path / "sd15.pt"), tok1, tok2, e1, e2)
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"junk\.bin.*as a torch file"):
        load_textual_inversion(str(tmp_path / "junk.bin"), tok1, tok2, e1, e2)
