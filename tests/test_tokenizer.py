"""Tests of form_data.tokenizer: vocab building, fixed-length encoding, loading sources and the [UNK] probe."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

import form_data.tokenizer as T
from form_data.tokenizer import build_vocab, load_tokenizer, read_captions
from zh_t2i_base.cli import UserError

CAPTIONS = ["一只猫在草地上", "两只狗在草地上奔跑", "红色的汽车 停在路边", "蓝天白云下的小猫", "iPhone手机"]


@pytest.fixture
def tok(tmp_path):
    return build_vocab(CAPTIONS, tmp_path / "vocab.txt")


@pytest.fixture
def no_cn_clip(monkeypatch):
    """Make sure a cn_clip that happens to be installed does not change which source wins."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cn_clip" else real(name, *a))


def fake_cn_clip(monkeypatch, root: Path, tokens: list[str]) -> Path:
    """A fake installed cn_clip package at root/cn_clip with clip/vocab.txt, found through find_spec."""
    pkg = root / "cn_clip"
    (pkg / "clip").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('cn_clip must not be imported')\n")
    vocab = pkg / "clip" / "vocab.txt"
    vocab.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    spec = importlib.machinery.ModuleSpec("cn_clip", None, origin=str(pkg / "__init__.py"), is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "cn_clip" else real(name, *a))
    return vocab


def bert_chinese_tokens(chars: str) -> list[str]:
    """A bert-base-chinese-like vocab: specials at bert's order, then the given characters."""
    return ["[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, "a", "b", "##a", "##b"]


def write_vocab(path: Path, tokens: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# build_vocab


def test_build_vocab_layout_and_order(tmp_path):
    tok = build_vocab(["猫猫猫狗狗鱼", "Ａ  b"], tmp_path / "v.txt", extra_chars="龙")
    lines = (tmp_path / "v.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    # Descending count, then code point; 'Ａ' is lowercased to 'ａ' like the tokenizer does; whitespace never a token.
    assert lines[5:8] == ["猫", "狗", "b"]
    assert lines.index("鱼") < lines.index("ａ") < lines.index("龙") < lines.index("z")
    assert not any(t.isspace() or t == "" for t in lines)
    assert {"0", "9", ",", "!", "##a", "##z", "##0", "##ａ"} <= set(lines)
    assert "##猫" not in lines  # CJK chars are always split apart, they need no continuation piece
    assert len(lines) == len(set(lines)) == tok.vocab_size
    # Deterministic: the same captions give the same file.
    build_vocab(["猫猫猫狗狗鱼", "Ａ  b"], tmp_path / "w.txt", extra_chars="龙")
    assert (tmp_path / "w.txt").read_bytes() == (tmp_path / "v.txt").read_bytes()


def test_build_vocab_min_count_and_dir_target(tmp_path):
    tok = build_vocab(["猫猫狗"], tmp_path, min_count=2)
    assert (tmp_path / "vocab.txt").is_file()
    assert tok.token_to_id("猫") is not None and tok.token_to_id("狗") is None
    assert tok.tokenize("猫狗") == ["猫", "[UNK]"]
    with pytest.raises(UserError, match="min_count"):
        build_vocab(["猫"], tmp_path / "x.txt", min_count=0)


def test_build_vocab_without_chinese_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"maps Chinese text to \[UNK\].*no CJK"):
        build_vocab(["hello world", "a cat"], tmp_path / "v.txt")


# ---------------------------------------------------------------------------------------------------------------------
# tokenize / encode / decode


def test_seen_chars_round_trip_and_unseen_is_unk(tok):
    for cap in CAPTIONS:
        assert "[UNK]" not in tok.tokenize(cap)
    ids = tok.encode("一只猫在草地上", 16)
    assert ids.dtype == torch.long and ids.shape == (1, 16)
    row = ids[0].tolist()
    assert row[0] == tok.cls_id and row[8] == tok.sep_id and row[9:] == [tok.pad_id] * 7
    assert row[1:8] == [tok.token_to_id(c) for c in "一只猫在草地上"]
    assert tok.decode(ids[0]) == "一只猫在草地上"
    assert tok.decode(ids[0].tolist()) == "一只猫在草地上"
    # '龙' never occurs in the captions: it is [UNK], and shown as such (never silently dropped).
    assert tok.tokenize("一条龙") == ["一", "[UNK]", "[UNK]"]
    row = tok.encode("猫龙", 6)[0].tolist()
    assert row == [tok.cls_id, tok.token_to_id("猫"), tok.unk_id, tok.sep_id, tok.pad_id, tok.pad_id]
    assert tok.decode(row) == "猫[UNK]"


def test_latin_text_is_not_unk_and_decodes(tok):
    assert tok.tokenize("iPhone Cat 2024!") == ["i", "##p", "##h", "##o", "##n", "##e", "c", "##a", "##t",
                                                 "2", "##0", "##2", "##4", "!"]
    assert tok.decode(tok.encode("iphone手机 cat dog", 32)[0]) == "iphone手机cat dog"


def test_fixed_length_padding_truncation_and_flag(tok):
    texts = ["猫", "一只猫在草地上", ""]
    ids, cut = tok.encode(texts, 5, return_truncated=True)
    assert ids.shape == (3, 5) and cut.dtype == torch.bool
    assert cut.tolist() == [False, True, False]
    c = tok.token_to_id
    assert ids[0].tolist() == [tok.cls_id, c("猫"), tok.sep_id, tok.pad_id, tok.pad_id]
    # Truncation keeps [SEP] as the last real token.
    assert ids[1].tolist() == [tok.cls_id, c("一"), c("只"), c("猫"), tok.sep_id]
    assert ids[2].tolist() == [tok.cls_id, tok.sep_id, tok.pad_id, tok.pad_id, tok.pad_id]
    # Exactly fitting is not truncated.
    _, cut = tok.encode("一只猫", 5, return_truncated=True)
    assert cut.tolist() == [False]


def test_fixed_length_without_special_tokens(tok):
    c = tok.token_to_id
    ids, cut = tok.encode(["猫", "一只猫在草地上"], 4, special=False, return_truncated=True)
    assert ids.tolist() == [[c("猫"), tok.pad_id, tok.pad_id, tok.pad_id], [c("一"), c("只"), c("猫"), c("在")]]
    assert cut.tolist() == [False, True]
    assert tok.cls_id not in ids and tok.sep_id not in ids
    ids = tok.encode("一只猫", 3, special=False)
    assert ids.tolist() == [[c("一"), c("只"), c("猫")]]
    with pytest.raises(ValueError):
        tok.encode("猫", 1, special=True)


def test_batch_shapes_match_single_encoding(tok):
    batch = tok.encode(CAPTIONS * 4, 32)
    assert batch.shape == (len(CAPTIONS) * 4, 32)
    for i, cap in enumerate(CAPTIONS):
        assert torch.equal(batch[i], tok.encode(cap, 32)[0])
    assert tok.decode_batch(batch[: len(CAPTIONS)]) == [
        "一只猫在草地上", "两只狗在草地上奔跑", "红色的汽车停在路边", "蓝天白云下的小猫", "iphone手机"]
    assert tok.encode([], 80).shape == (0, 80)


def test_pickle_round_trip(tok):
    """DataLoader workers receive the tokenizer pickled."""
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode(CAPTIONS, 32), tok.encode(CAPTIONS, 32))
    assert clone.source == tok.source


def test_save_and_reload(tok, tmp_path, no_cn_clip):
    path = tok.save(tmp_path / "saved")
    assert path == tmp_path / "saved" / "vocab.txt"
    again = load_tokenizer(tmp_path / "saved")
    assert again.vocab_size == tok.vocab_size
    assert torch.equal(again.encode(CAPTIONS, 32), tok.encode(CAPTIONS, 32))


# ---------------------------------------------------------------------------------------------------------------------
# Checks at load time: special tokens and the Chinese probe


def test_probe_rejects_vocab_without_cjk(tmp_path):
    path = write_vocab(tmp_path / "v.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "a", "##b"])
    with pytest.raises(UserError, match=r"maps Chinese text to \[UNK\].*no CJK"):
        load_tokenizer(path)


def test_probe_rejects_tokenizer_that_maps_chinese_to_unk(tmp_path):
    """The transformers-5 failure: a vocab full of Chinese chars, but no CJK splitting, so a run of Chinese chars is
    one 'word' whose '##' continuations are missing -> the whole caption becomes one [UNK]."""
    vocab_file = write_vocab(tmp_path / "vocab.txt", bert_chinese_tokens("一只猫在草地上两狗"))
    broken = Tokenizer(models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]"))
    broken.normalizer = normalizers.BertNormalizer(handle_chinese_chars=False, lowercase=True)
    broken.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert broken.encode("一只猫").tokens == ["[UNK]"]  # the construction really is broken
    broken.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match=r"vocab .*tokenizer\.json maps Chinese text to \[UNK\]"):
        load_tokenizer(tmp_path)
    # The same vocab through the standard pipeline is fine.
    assert load_tokenizer(vocab_file).tokenize("一只猫") == ["一", "只", "猫"]


def test_missing_special_token_is_named(tmp_path):
    path = write_vocab(tmp_path / "v.txt", ["[PAD]", "[UNK]", "[SEP]", "猫", "狗"])
    with pytest.raises(UserError, match=r"lacks the special token\(s\) \[CLS\]"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def test_explicit_vocab_dir_and_file(tmp_path):
    write_vocab(tmp_path / "bert" / "vocab.txt", bert_chinese_tokens("一只猫狗"))
    for path in (tmp_path / "bert", tmp_path / "bert" / "vocab.txt", str(tmp_path / "bert")):
        tok = load_tokenizer(path)
        assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
        assert tok.encode("一只猫", 6).tolist() == [[3, 6, 7, 8, 4, 0]]
        assert tok.source == f"vocab {tmp_path / 'bert' / 'vocab.txt'}"
    # No [MASK]: allowed, mask_id is None.
    write_vocab(tmp_path / "nomask.txt", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "猫"])
    assert load_tokenizer(tmp_path / "nomask.txt").mask_id is None


def test_explicit_hf_tokenizer_json_dir(tmp_path):
    """A local HF tokenizer dir (as downloaded for hfl/chinese-roberta-wwm-ext): tokenizer.json, with padding and
    truncation settings of its own that must not leak into fixed-length encoding."""
    vocab = {t: i for i, t in enumerate(bert_chinese_tokens("一只猫狗在"))}
    hf = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.enable_padding(pad_id=0, length=3)
    hf.enable_truncation(max_length=2)
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.source.endswith("tokenizer.json") and tok.vocab_size == len(vocab)
    c = vocab.__getitem__
    assert tok.encode("一只猫在", 8).tolist() == [[c("[CLS]"), c("一"), c("只"), c("猫"), c("在"), c("[SEP]"), 0, 0]]
    assert tok.decode(tok.encode("一只狗", 8)[0]) == "一只狗"


def test_cn_clip_vocab_found_without_importing(tmp_path, monkeypatch):
    vocab = fake_cn_clip(monkeypatch, tmp_path, bert_chinese_tokens("一只猫"))
    assert T.cn_clip_vocab() == vocab
    tok = load_tokenizer()
    assert tok.source == f"cn_clip vocab {vocab}"
    assert tok.tokenize("一只猫") == ["一", "只", "猫"]


def test_cn_clip_vocab_elsewhere_in_package(tmp_path, monkeypatch):
    vocab = fake_cn_clip(monkeypatch, tmp_path, bert_chinese_tokens("一只猫"))
    moved = vocab.parent.parent / "assets" / "vocab.txt"
    moved.parent.mkdir()
    vocab.rename(moved)
    assert T.cn_clip_vocab() == moved
    assert load_tokenizer().source == f"cn_clip vocab {moved}"


def test_source_order(tmp_path, monkeypatch):
    explicit = write_vocab(tmp_path / "explicit" / "vocab.txt", bert_chinese_tokens("一二"))
    build_vocab(["三四"], tmp_path / "fallback.txt")
    # No cn_clip: the fallback vocab is used when no path is given, the explicit path beats it.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    fallback = tmp_path / "fallback.txt"
    assert load_tokenizer(fallback_vocab=fallback).source == f"fallback vocab {fallback}"
    assert load_tokenizer(explicit, fallback_vocab=tmp_path / "fallback.txt").source == f"vocab {explicit}"
    # With cn_clip: it beats the fallback, and the explicit path beats it.
    cn = fake_cn_clip(monkeypatch, tmp_path / "site", bert_chinese_tokens("五六"))
    assert load_tokenizer(fallback_vocab=tmp_path / "fallback.txt").source == f"cn_clip vocab {cn}"
    assert load_tokenizer(explicit, fallback_vocab=tmp_path / "fallback.txt").source == f"vocab {explicit}"


def test_missing_paths_and_no_source(tmp_path, no_cn_clip):
    with pytest.raises(UserError, match="vocab not found: .*nope.txt"):
        load_tokenizer(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="vocab not found: .*empty"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="vocab not found: .*missing.txt.*python -m form_data vocab"):
        load_tokenizer(fallback_vocab=tmp_path / "missing.txt")
    with pytest.raises(UserError, match="python -m form_data vocab"):
        load_tokenizer()


def test_bad_tokenizer_json_is_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# read_captions


def test_read_captions_all_formats(tmp_path):
    (tmp_path / "train.csv").write_text('url,caption\nhttp://a/1.jpg,一只猫\nhttp://a/2.jpg,"红色, 汽车"\n',
                                        encoding="utf-8")
    (tmp_path / "train.tsv").write_text("title\tfilepath\n一只猫\t/img/1.jpg\n两只狗\t/img/2.jpg\n", encoding="utf-8")
    (tmp_path / "dalle.jsonl").write_text(
        "".join(json.dumps({"image_path": f"{i}.jpg", "sentences": s}, ensure_ascii=False) + "\n"
                for i, s in enumerate(["一只猫", "两只狗"])), encoding="utf-8")
    (tmp_path / "brivl.jsonl").write_text(
        json.dumps({"image_id": "1", "sentences": [["sur_text", "蓝天白云"]], "bbox": []}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    assert list(read_captions(tmp_path / "train.csv")) == ["一只猫", "红色, 汽车"]
    assert list(read_captions(tmp_path / "train.tsv")) == ["一只猫", "两只狗"]
    assert list(read_captions(tmp_path / "dalle.jsonl")) == ["一只猫", "两只狗"]
    assert list(read_captions(tmp_path / "brivl.jsonl")) == ["蓝天白云"]
    # The vocab command's pipeline: captions of a file straight into build_vocab.
    tok = build_vocab(read_captions(tmp_path / "train.tsv"), tmp_path / "v.txt")
    assert "[UNK]" not in tok.tokenize("两只猫")


def test_read_captions_errors(tmp_path):
    with pytest.raises(UserError, match="no such caption file"):
        read_captions(tmp_path / "absent.csv")
    (tmp_path / "odd.csv").write_text("link,text\nhttp://a,猫\n", encoding="utf-8")
    with pytest.raises(UserError, match="columns found: link, text"):
        read_captions(tmp_path / "odd.csv")
    (tmp_path / "odd.jsonl").write_text('{"image": "a.jpg", "label": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match="fields found: image, label"):
        read_captions(tmp_path / "odd.jsonl")


def test_real_cn_clip_vocab_tokenizes_chinese():
    """With the optional cn_clip installed (make test installs it), the 21128-entry BERT vocab is the default."""
    pytest.importorskip("cn_clip")
    from form_data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    assert tok.vocab_size == 21128 and "cn_clip" in tok.source
    ids = tok.encode(["这碗红烧牛肉面的肉很多，真好吃"], 32)[0].tolist()
    assert ids[0] == tok.cls_id == 101 and tok.sep_id in ids
    assert tok.unk_id not in ids
    assert tok.decode(ids) == "这碗红烧牛肉面的肉很多，真好吃"


def test_vocab_cli_builds_and_reports_bad_input(tmp_path, cli):
    data = tmp_path / "train_clip.csv"
    data.write_text("title\tfilepath\n大红色圆形\ta.png\n小蓝色星形\tb.png\n", encoding="utf-8")
    r = cli("-m", "form_data", "vocab", str(data), "--out", str(tmp_path / "vocab.txt"))
    assert r.returncode == 0, r.stderr
    from form_data.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "vocab.txt")
    assert tok.unk_id not in tok.encode(["小红色星形"], 8)[0].tolist()

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"image_path": "a.png", "sentences": "x"}\n{"image_path": "b.png", "sentences": "\xff"}\n')
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n", encoding="utf-8")
    for args, needle in [((str(bad),), "bad.jsonl:2: not valid UTF-8"), ((str(tmp_path / "nope.csv"),), "nope.csv"),
                         ((str(wrong),), "columns found: a, b")]:
        r = cli("-m", "form_data", "vocab", *args, "--out", str(tmp_path / "v2.txt"))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "v2.txt").exists()
