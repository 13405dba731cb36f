"""dalle_train: cached sampling == full forward, guidance, top-k, seeds, training on the synthetic set, dalle_gen.py
end to end and its errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import one_line_error
from dalle_train.generate import generate, load_dalle, read_checkpoint
from dalle_train.model import DALLE, DALLEConfig
from dalle_train.sample import guided, pick, sample_tokens, top_k_count
from dalle_train.train import DALLETrainConfig, TokenDataset, train
from form_data import synth
from form_data.tokenizer import build_vocab, load_tokenizer, read_captions
from train_runtime import RuntimeConfig
from vae_train.tokenize import tokenize
from vae_train.train import VAEConfig
from vae_train.train import train as train_vae
from zh_t2i_base.cli import UserError


def tiny_model(fmap: int = 4, seed: int = 0, scale: float = 0.3) -> DALLE:
    """A tiny model whose weights are large enough that every layer changes the logits."""
    torch.manual_seed(seed)
    cfg = DALLEConfig(num_text_tokens=50, text_seq_len=6, num_image_tokens=20, image_seq_len=16,
                      image_fmap_size=fmap, dim=32, depth=2, heads=2, dim_head=16)
    m = DALLE(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)
    return m


def cached_logits(m: DALLE, text: torch.Tensor, image: torch.Tensor, cond_scale: float | None) -> torch.Tensor:
    """Per-step logits of teacher-forced cached decoding (with guidance: [cond; null] in one batch)."""
    b = text.shape[0]
    if cond_scale is not None:
        text = torch.cat([text, torch.full_like(text, m.cfg.text_pad_id)])
    cache = m.new_cache(text.shape[0])
    out = [m.prefill(text, cache)]
    for i in range(m.cfg.image_seq_len - 1):
        tok = image[:, i] if cond_scale is None else torch.cat([image[:, i], image[:, i]])
        out.append(m.step(tok, cache))
    logits = torch.stack(out, 1)
    return logits if cond_scale is None else guided(logits, cond_scale)[:b]


@pytest.mark.parametrize("fmap", [4, 0], ids=["grid", "gridless"])
@pytest.mark.parametrize("cond_scale", [None, 3.0], ids=["plain", "cfg"])
def test_cached_decoding_equals_full_forward(fmap, cond_scale):
    m = tiny_model(fmap)
    text = torch.randint(1, 50, (3, 6))
    image = torch.randint(0, 20, (3, 16))
    with torch.no_grad():
        _, full = m.logits(text, image[:, :-1])
        if cond_scale is not None:
            _, null = m.logits(torch.zeros_like(text), image[:, :-1])
            full = null + (full - null) * cond_scale
        cached = cached_logits(m, text, image, cond_scale)
    assert full.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (cached - full).abs().max() <= 1e-4


def test_guidance_at_scale_one_equals_plain_sampling_and_prompt_is_untouched():
    m = tiny_model()
    text = torch.randint(1, 50, (1, 6))
    before = text.clone()
    plain = sample_tokens(m, text, list(range(5)), batch_size=2, top_k=7)
    with_null = sample_tokens(m, text, list(range(5)), batch_size=2, top_k=7, cond_scale=1.0, guidance=True)
    assert torch.equal(plain, with_null)
    assert torch.equal(text, before)
    guided_ids = sample_tokens(m, text, list(range(5)), batch_size=2, top_k=7, cond_scale=4.0)
    assert torch.equal(text, before)
    assert not torch.equal(guided_ids, plain)  # guidance does change what is sampled


def test_top_k_keeps_exactly_k_image_ids():
    assert top_k_count(1024, filter_thres=0.9) == 102  # a fraction of the IMAGE vocabulary, not text + image
    assert top_k_count(20, top_k=50) == 20 and top_k_count(20) == 20
    logits = torch.randn(4, 20)
    allowed = logits.topk(3, dim=-1).indices
    seen = [set() for _ in range(4)]
    for s in range(300):
        ids = pick(logits, 3, 5.0, [torch.Generator().manual_seed(1000 * s + r) for r in range(4)])
        for r in range(4):
            seen[r].add(int(ids[r]))
    for r in range(4):
        assert seen[r] == set(allowed[r].tolist())  # exactly the k best, each of them reachable


def test_same_seed_same_images_independent_of_batch_size():
    m = tiny_model()
    text = torch.randint(1, 50, (1, 6))
    a = sample_tokens(m, text, [3, 4, 5, 6], batch_size=4, filter_thres=0.5)
    b = sample_tokens(m, text, [3, 4, 5, 6], batch_size=3, filter_thres=0.5)
    c = sample_tokens(m, text, [5], batch_size=1, filter_thres=0.5)
    assert torch.equal(a, b) and torch.equal(a[2], c[0])
    assert not torch.equal(a[0], a[1])


# ---------------------------------------------------------------------------------------------------------------------
# training on the synthetic set, and generation from the checkpoint


def token_pipeline(root: Path, n_train: int, n_val: int, vae_steps: int, width: int, codes: int,
                   batch_size: int) -> dict[str, Path]:
    """Synthetic set (16 px) -> a dVAE-VQ (``width`` channels and code size, ``codes`` codes; its encoding is
    deterministic) -> token files of both splits and a vocab of the captions' own characters (a 21128-entry text head
    would cost most of a CPU step)."""
    synth.write_dataset(root / "data", n_train=n_train, n_val=n_val, image_size=16, progress=False)
    vc = VAEConfig(model="dvae", train_data=str(root / "data" / "train_clip.csv"), image_size=16, num_layers=2,
                   hidden_dim=width, num_resnet_blocks=0, num_tokens=codes, emb_dim=width, quantizer="vq",
                   eval_images=16)
    train_vae(vc, RuntimeConfig(out_dir=str(root / "vae"), max_steps=vae_steps, batch_size=batch_size, workers=0,
                                lr=3e-3, log_every=10, save_every=1000))
    for split in ("train", "val"):
        tokenize(str(root / "vae"), str(root / "data" / f"{split}_clip.csv"), root / f"{split}_tokens.pt",
                 batch_size=64, workers=0, progress=False)
    build_vocab(read_captions(root / "data" / "train_clip.csv"), root / "vocab.txt")
    return {"root": root, "vae": root / "vae", "train": root / "train_tokens.pt", "val": root / "val_tokens.pt",
            "vocab": root / "vocab.txt"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    return token_pipeline(tmp_path_factory.mktemp("dalle"), 256, 64, vae_steps=30, width=16, codes=32, batch_size=16)


def image_ce(model: DALLE, token_file: Path, vocab: Path) -> float:
    data = TokenDataset(token_file, load_tokenizer(vocab), model.cfg.text_seq_len)
    with torch.no_grad():
        return model(data.text, data.image_tokens)[1]["loss_img"]


@pytest.fixture(scope="module")
def trained(pipeline) -> Path:
    out = pipeline["root"] / "dalle"
    dc = DALLETrainConfig(train_data=str(pipeline["train"]), val_data=str(pipeline["val"]),
                          vocab=str(pipeline["vocab"]), text_seq_len=16, dim=64, depth=2, heads=2, dim_head=32,
                          null_cond_prob=0.1, sample_images=4)
    rc = RuntimeConfig(out_dir=str(out), max_steps=120, batch_size=32, lr=3e-3, warmup_steps=10, workers=0,
                       log_every=10, eval_every=40, save_every=1000)
    train(dc, rc)
    return out


@pytest.mark.slow
def test_training_on_synthetic_set_lowers_image_ce(trained, pipeline):
    bundle = load_dalle(trained, "cpu")
    torch.manual_seed(0)
    untrained = image_ce(DALLE(bundle.model.cfg).eval(), pipeline["val"], pipeline["vocab"])
    after = image_ce(bundle.model, pipeline["val"], pipeline["vocab"])
    # 32 codes: an untrained model sits near ln 32 = 3.47 nats on held-out images; training must remove >= 1 nat
    assert untrained > 3.0
    assert after < untrained - 1.0, (untrained, after)
    logged = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/loss_img"] for r in logged if "eval/loss_img" in r][-1] == pytest.approx(after, abs=1e-4)
    assert (trained / "samples_latest.png").is_file()
    meta, _, _ = read_checkpoint(trained)
    assert meta["image_tokenizer"]["num_tokens"] == 32
    assert meta["text_tokenizer"]["vocab_size"] == load_tokenizer(pipeline["vocab"]).vocab_size


@pytest.mark.slow
def test_generate_api_reproducible_and_truncates_long_text(trained):
    bundle = load_dalle(trained, "cpu")
    a = generate(bundle, "一个大的红色圆形", 3, seed=7, batch_size=2)
    b = generate(bundle, "一个大的红色圆形", 3, seed=7, batch_size=3)
    assert a.images.shape == (3, 3, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1
    # same tokens; the decoder's batch shape may move pixels by float rounding only
    assert torch.allclose(a.images, b.images, atol=1e-5) and a.seeds == [7, 8, 9]
    with pytest.warns(UserWarning, match="truncated"):
        long = generate(bundle, "红色圆形" * 20, 1)
    assert long.truncated


@pytest.mark.slow
def test_dalle_gen_end_to_end(trained, tmp_path, cli):
    out = tmp_path / "gen"
    r = cli("dalle_gen.py", "一个大的红色圆形", "5", str(out), "--checkpoint", str(trained), "--batch-size", "2",
            "--top-k", "8", "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "3.png", "4.png", "grid.png",
                                                      "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt"] == "一个大的红色圆形" and meta["seeds"] == [3, 4, 5, 6, 7]
    assert meta["settings"]["top_k_resolved"] == 8 and meta["checkpoint"].endswith(".pt")
    r = cli("dalle_gen.py", "一个大的红色圆形", "2", str(tmp_path / "jpg"), "--checkpoint", str(trained), "--format",
            "jpg", "--quiet")
    assert r.returncode == 0 and (tmp_path / "jpg" / "1.jpg").is_file()
    r = cli("dalle_gen.py", "红色圆形" * 20, "1", str(tmp_path / "long"), "--checkpoint", str(trained), "--quiet")
    assert r.returncode == 0 and "truncated" in r.stderr


@pytest.mark.slow
def test_dalle_gen_prompt_file_is_one_run_per_line(trained, tmp_path, cli):
    """``@FILE``: prompt i -> DIR/p{i} with seeds seed + 1000 i + j, the same images as one call per prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一个大的红色圆形\n\n小蓝色正方形\n", encoding="utf-8")
    out = tmp_path / "many"
    r = cli("dalle_gen.py", f"@{prompts}", "3", str(out), "--checkpoint", str(trained), "--seed", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["p0", "p1"]
    metas = [json.loads((out / p / "meta.json").read_text()) for p in ("p0", "p1")]
    assert [m["prompt"] for m in metas] == ["一个大的红色圆形", "小蓝色正方形"]
    assert metas[0]["seeds"] == [5, 6, 7] and metas[1]["seeds"] == [1005, 1006, 1007]
    single = tmp_path / "single"
    r = cli("dalle_gen.py", "小蓝色正方形", "3", str(single), "--checkpoint", str(trained), "--seed", "1005", "--quiet")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert (single / f"{i}.png").read_bytes() == (out / "p1" / f"{i}.png").read_bytes()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert "no prompt" in one_line_error(cli("dalle_gen.py", f"@{empty}", "1", str(tmp_path / "e"), "--checkpoint",
                                             str(trained)))
    assert "cannot read the prompt file" in one_line_error(cli("dalle_gen.py", f"@{tmp_path / 'nope.txt'}", "1",
                                                               str(tmp_path / "e"), "--checkpoint", str(trained)))
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_dalle_gen_streams_resumes_and_refuses_another_runs_dir(trained, tmp_path, cli_fast, monkeypatch):
    """Images are written batch by batch; an interrupted run resumes where it stopped with the same images as an
    uninterrupted one; another prompt's DIR is refused unless --overwrite, which also drops images beyond N."""
    import dalle_train.generate as G

    ck = str(trained)
    args = ["一个大的红色圆形", "5", "--checkpoint", ck, "--batch-size", "2", "--seed", "3", "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli_fast("dalle_gen.py", args[0], args[1], str(whole), *args[2:]).returncode == 0

    real = G.generate_batches

    def interrupted(*a, **kw):  # a kill after the first batch (Ctrl-C: exit 130, nothing cleaned up)
        batches = real(*a, **kw)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "generate_batches", interrupted)
    assert cli_fast("dalle_gen.py", args[0], args[1], str(part), *args[2:]).returncode == 130
    assert sorted(p.name for p in part.iterdir()) == sorted(["0.png", "1.png", G.RUN_FILE])  # no meta.json yet
    huge = tmp_path / "huge"  # a huge N starts at once (nothing of size N is built up front) and streams
    assert cli_fast("dalle_gen.py", args[0], "1000000000", str(huge), *args[2:]).returncode == 130
    assert sorted(p.name for p in huge.iterdir()) == sorted(["0.png", "1.png", G.RUN_FILE])
    monkeypatch.setattr(G, "generate_batches", real)
    r = cli_fast("dalle_gen.py", args[0], args[1], str(part), *args[2:])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["reused"] == 2
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in whole.iterdir())
    for name in ("0.png", "1.png", "2.png", "3.png", "4.png", "grid.png"):
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name
    meta = json.loads((part / "meta.json").read_text())
    assert meta["seeds"] == [3, 4, 5, 6, 7] and meta["reused"] == 2 and meta["n"] == 5

    r = cli_fast("dalle_gen.py", "小蓝色正方形", "2", str(part), "--checkpoint", ck, "--quiet")
    assert "holds the images of another run" in one_line_error(r) and (part / "4.png").is_file()
    r = cli_fast("dalle_gen.py", "小蓝色正方形", "2", str(part), "--checkpoint", ck, "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in part.iterdir()) == ["0.png", "1.png", "grid.png", "meta.json"]
    assert json.loads((part / "meta.json").read_text())["prompt"] == "小蓝色正方形"

    monkeypatch.setattr(G, "GRID_MAX", 2)  # the grid shows a fixed number of images whatever N is
    capped = tmp_path / "capped"
    assert cli_fast("dalle_gen.py", args[0], "3", str(capped), *args[2:]).returncode == 0
    side = Image.open(capped / "0.png").size[0]
    assert Image.open(capped / "grid.png").size == (2 * (side + 2) + 2, side + 4)


@pytest.mark.slow
def test_dalle_gen_bad_inputs_exit_2(trained, tmp_path, cli, cli_fast, pipeline):
    ck, fast = str(trained), cli_fast  # one real process below; the rest in-process
    assert "not found" in one_line_error(cli("dalle_gen.py", "红色", "2", str(tmp_path / "a"), "--checkpoint",
                                             str(tmp_path / "missing")))
    assert "must be an integer >= 1" in one_line_error(fast("dalle_gen.py", "红色", "0", str(tmp_path / "b"),
                                                   "--checkpoint", ck))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in one_line_error(fast("dalle_gen.py", "红色", "1", str(blocker / "sub"), "--checkpoint", ck))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n红\n色\n圆\n形\n")
    assert "vocab mismatch" in one_line_error(fast("dalle_gen.py", "红色", "1", str(tmp_path / "c"), "--checkpoint", ck,
                                                  "--vocab", str(vocab)))
    r = fast("dalle_gen.py", "红色", "1", str(tmp_path / "c2"), "--checkpoint", ck, "--vocab", str(pipeline["vocab"]),
            "--quiet")
    assert r.returncode == 0, r.stderr  # the right vocab passes the check
    not_ckpt = tmp_path / "ckpt-00000001.pt"
    not_ckpt.write_bytes(b"garbage")
    assert "not a loadable checkpoint" in one_line_error(fast("dalle_gen.py", "红色", "1", str(tmp_path / "d"),
                                                             "--checkpoint", str(not_ckpt)))
    assert "filter-thres" in one_line_error(fast("dalle_gen.py", "红色", "1", str(tmp_path / "e"), "--checkpoint", ck,
                                                "--filter-thres", "1.5"))
    for flag, value in (("--temperature", "nan"), ("--cond-scale", "inf"), ("--filter-thres", "-0.5")):
        line = one_line_error(fast("dalle_gen.py", "红色", "1", str(tmp_path / "f"), "--checkpoint", ck, flag, value))
        assert flag in line and ("finite" in line or "must be in" in line), line
    empty = fast("dalle_gen.py", " ", "1", str(tmp_path / "g"), "--checkpoint", ck)
    assert "the text is empty" in one_line_error(empty)
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.slow
def test_train_cli_errors_and_on_the_fly_encoding(pipeline, tmp_path, cli, cli_fast):
    r = cli("-m", "dalle_train", "--train-data", str(tmp_path / "nope.pt"))
    assert "not found" in one_line_error(r)
    r = cli_fast("-m", "dalle_train", "--train-data", str(pipeline["root"] / "data" / "train_clip.csv"))
    assert "--image-tokenizer" in one_line_error(r)
    r = cli_fast("-m", "dalle_train", "--train-data", str(pipeline["train"]), "--null-cond-prob", "1.5")
    assert "null-cond-prob" in one_line_error(r)
    # on-the-fly encoding: image split + tokenizer, a few steps
    out = tmp_path / "otf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(DALLETrainConfig(train_data=str(pipeline["root"] / "data" / "train_clip.csv"),
                                        image_tokenizer=str(pipeline["vae"]), vocab=str(pipeline["vocab"]),
                                        text_seq_len=16, dim=32, depth=1,
                                        heads=2, dim_head=16, sample_images=0),
                       RuntimeConfig(out_dir=str(out), max_steps=3, batch_size=8, workers=0, log_every=1))
    assert result["step"] == 3 and (out / "dalle.safetensors").is_file()
    bundle = load_dalle(out / "dalle.safetensors", "cpu")
    assert bundle.model.cfg.image_seq_len == 16
    with pytest.raises(UserError, match="not found"):
        load_dalle(out, "cpu", image_tokenizer=str(tmp_path / "moved"))
