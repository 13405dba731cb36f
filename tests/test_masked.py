"""dalle_train's masked generator (MaskGIT style): the masking schedules, the sampler's guarantees (unchanged known
tokens, per-image seeds, guidance at scale 1, in-order unmasking, the Styled-VQ 1D path), overfitting one caption,
training through ``python -m dalle_train --kind masked`` and ``dalle_gen.py`` end to end over a masked checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_dalle import token_pipeline

from conftest import one_line_error
from dalle_train.generate import generate, load_dalle, read_checkpoint
from dalle_train.masked import MaskedDALLE, masked_count, random_mask
from dalle_train.masked_sample import mask_schedule, sample_tokens_masked
from dalle_train.model import DALLE, DALLEConfig
from dalle_train.train import DALLETrainConfig, train
from train_runtime import RuntimeConfig
from zh_t2i_base.cli import UserError


def tiny_cfg(fmap: int = 4, seq: int = 16, **kw) -> DALLEConfig:
    return DALLEConfig(num_text_tokens=50, text_seq_len=6, num_image_tokens=20, image_seq_len=seq,
                       image_fmap_size=fmap, dim=32, depth=2, heads=2, dim_head=16, **kw)


def tiny_model(fmap: int = 4, seq: int = 16, seed: int = 0, scale: float = 0.3) -> MaskedDALLE:
    """Weights large enough that every layer changes the logits."""
    torch.manual_seed(seed)
    m = MaskedDALLE(tiny_cfg(fmap, seq)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)
    return m


def record_masks(model: MaskedDALLE, monkeypatch) -> list[torch.Tensor]:
    """The [MASK] map of the conditional rows of every forward the sampler makes."""
    seen, real = [], model.logits

    def logits(text, image):
        seen.append(image == model.mask_id)
        return real(text, image)

    monkeypatch.setattr(model, "logits", logits)
    return seen


# ---------------------------------------------------------------------------------------------------------------------
# schedules


def test_sampling_schedule_counts():
    assert mask_schedule(16, 12) == [15, 14, 13, 12, 11, 10, 9, 8, 6, 4, 2, 0]
    assert mask_schedule(256, 12)[:3] == [math.floor(256 * math.cos(math.pi / 2 * s / 12)) for s in (1, 2, 3)]
    assert mask_schedule(3, 12) == [2, 1, 0] + [0] * 9  # at least one token per step: done early
    assert mask_schedule(5, 1) == [0] and mask_schedule(0, 4) == [0, 0, 0, 0]
    for n, s in ((16, 12), (36, 8), (256, 12), (7, 3)):
        counts = [n, *mask_schedule(n, s)]
        assert counts[-1] == 0 and all(b < a or a == 0 for a, b in zip(counts, counts[1:], strict=False))
    with pytest.raises(ValueError):
        mask_schedule(4, 0)


def test_sampler_follows_the_schedule_and_unmasks_everything(monkeypatch):
    m = tiny_model()
    seen = record_masks(m, monkeypatch)
    out = sample_tokens_masked(m, torch.randint(1, 50, (1, 6)), [0, 1], steps=5, top_k=5)
    assert len(seen) == 5 and [int(x.sum(1)[0]) for x in seen] == [16, *mask_schedule(16, 5)[:-1]]
    assert bool(((out >= 0) & (out < 20)).all())  # all unmasked, never [MASK]
    for before, after in zip(seen, seen[1:], strict=False):  # a fixed token is never masked again
        assert not bool((after & ~before).any())


def test_training_mask_follows_the_cosine_schedule():
    assert masked_count(1.0, 16) == 16 and masked_count(0.0, 16) == 1 and masked_count(0.5, 16) == 8
    assert masked_count(math.cos(math.pi / 2 * 0.999), 16) == 1  # at least one
    g = torch.Generator().manual_seed(3)
    mask = random_mask(200, 16, g)
    u = torch.rand(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert mask.sum(1).tolist() == [masked_count(math.cos(math.pi / 2 * float(x)), 16) for x in u]
    assert mask.float().mean() == pytest.approx(2 / math.pi + 0.5 / 16, abs=0.05)  # E[cos(pi/2 u)] = 2/pi, + ceil


def test_loss_is_cross_entropy_on_the_masked_positions_only():
    m = tiny_model()
    text, image = torch.randint(1, 50, (4, 6)), torch.randint(0, 20, (4, 16))
    with torch.no_grad():
        loss, logs = m(text, image, generator=torch.Generator().manual_seed(1))
        mask = random_mask(4, 16, torch.Generator().manual_seed(1))
        logits = m.logits(text, image.masked_fill(mask, m.mask_id))
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits[mask], image[mask])), rel=1e-5)
    assert logs["mask_ratio"] == pytest.approx(float(mask.float().mean()))
    with pytest.raises(ValueError, match="image ids"):
        m(text, image.masked_fill(mask, m.mask_id))


# ---------------------------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("order", ["confidence", "sequential"])
def test_fully_unmasked_input_is_returned_unchanged(order):
    m = tiny_model()
    init = torch.randint(0, 20, (3, 16))
    before = init.clone()
    out = sample_tokens_masked(m, torch.randint(1, 50, (1, 6)), [0, 1, 2], init_tokens=init, order=order,
                               cond_scale=3.0)
    assert torch.equal(out, init) and torch.equal(init, before)
    partial = init.clone()
    partial[:, 5:9] = m.mask_id
    out = sample_tokens_masked(m, torch.randint(1, 50, (1, 6)), [0, 1, 2], init_tokens=partial, order=order)
    assert torch.equal(out[:, :5], init[:, :5]) and torch.equal(out[:, 9:], init[:, 9:])  # only [MASK]s filled
    assert bool((out < 20).all())


def test_same_seed_same_image_at_any_batch_size():
    m = tiny_model()
    text = torch.randint(1, 50, (1, 6))
    a = sample_tokens_masked(m, text, [3, 4, 5, 6], batch_size=4, filter_thres=0.5, cond_scale=2.0)
    b = sample_tokens_masked(m, text, [3, 4, 5, 6], batch_size=3, filter_thres=0.5, cond_scale=2.0)
    c = sample_tokens_masked(m, text, [5], batch_size=1, filter_thres=0.5, cond_scale=2.0)
    assert torch.equal(a, b) and torch.equal(a[2], c[0])
    assert not torch.equal(a[0], a[1])


def test_guidance_at_scale_one_equals_plain_sampling_and_prompt_is_untouched():
    m = tiny_model()
    text = torch.randint(1, 50, (1, 6))
    before = text.clone()
    plain = sample_tokens_masked(m, text, list(range(5)), batch_size=2, top_k=7)
    with_null = sample_tokens_masked(m, text, list(range(5)), batch_size=2, top_k=7, cond_scale=1.0, guidance=True)
    assert torch.equal(plain, with_null) and torch.equal(text, before)
    guided_ids = sample_tokens_masked(m, text, list(range(5)), batch_size=2, top_k=7, cond_scale=4.0)
    assert not torch.equal(guided_ids, plain) and torch.equal(text, before)


def test_top_k_one_is_greedy_and_never_samples_mask():
    m = tiny_model()
    text = torch.randint(1, 50, (1, 6))
    a = sample_tokens_masked(m, text, [0], top_k=1, choice_temperature=0.0)
    b = sample_tokens_masked(m, text, [99], top_k=1, choice_temperature=0.0)
    assert torch.equal(a, b)  # no noise left: the seed does not matter
    many = sample_tokens_masked(m, text, list(range(8)), temperature=50.0)  # near-uniform over every real id
    assert bool((many < 20).all()) and len(set(many.flatten().tolist())) > 10


def test_styled_vq_1d_path_and_in_order_unmasking(monkeypatch):
    m = tiny_model(fmap=0, seq=36)
    assert m.image_pos_emb.weight.shape == (36, 32) and not hasattr(m, "image_row_emb")
    loss, _ = m(torch.randint(1, 50, (2, 6)), torch.randint(0, 20, (2, 36)), 0.5)
    loss.backward()
    assert m.image_pos_emb.weight.grad is not None and float(m.image_pos_emb.weight.grad.abs().sum()) > 0
    m.zero_grad()
    seen = record_masks(m, monkeypatch)
    out = sample_tokens_masked(m, torch.randint(1, 50, (1, 6)), [0, 1, 2], steps=6, order="sequential", cond_scale=2.0)
    assert out.shape == (3, 36) and bool((out < 20).all())
    counts = mask_schedule(36, 6)
    assert len(seen) == 6
    for step, masked in enumerate(seen[1:]):
        left = counts[step]  # after step `step`, the LAST `left` positions are the ones still masked
        expect = torch.zeros(36, dtype=torch.bool)
        expect[36 - left:] = True
        assert all(torch.equal(row, expect) for row in masked), step
    with pytest.raises(ValueError, match="order"):
        sample_tokens_masked(m, torch.randint(1, 50, (1, 6)), [0], order="random")


def test_tiny_model_overfits_one_caption():
    torch.manual_seed(0)
    m = MaskedDALLE(tiny_cfg())
    text = torch.randint(1, 50, (1, 6))
    image = torch.randint(0, 20, (1, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    m.train()
    for _ in range(150):
        loss, _ = m(text.expand(8, -1), image.expand(8, -1), null_cond_prob=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    out = sample_tokens_masked(m, text, list(range(8)), top_k=5, cond_scale=2.0)
    assert (out == image).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------------
# the commands: training with --kind masked, checkpoints, dalle_gen.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic set (16 px) -> a 1-step dVAE (enough to decode) -> token files -> a masked and an AR DALLE."""
    tokens = token_pipeline(tmp_path_factory.mktemp("masked"), 32, 8, vae_steps=1, width=8, codes=16, batch_size=8)
    root = tokens["root"]
    out = {"root": root, "vocab": tokens["vocab"], "val": tokens["val"]}
    for kind, steps in (("masked", 20), ("dalle", 2)):
        dc = DALLETrainConfig(kind=kind, train_data=str(tokens["train"]), val_data=str(tokens["val"]),
                              vocab=str(tokens["vocab"]), text_seq_len=16, dim=32, depth=1, heads=2, dim_head=16,
                              null_cond_prob=0.2, sample_images=2, sample_steps=4)
        train(dc, RuntimeConfig(out_dir=str(root / kind), max_steps=steps, batch_size=8, lr=3e-3, workers=0,
                                log_every=5, save_every=1000))
        out[kind] = root / kind
    return out


def test_masked_training_writes_a_masked_checkpoint(runs):
    meta, _, _ = read_checkpoint(runs["masked"])
    assert meta["kind"] == "dalle" and meta["model_kind"] == "masked"
    assert read_checkpoint(runs["dalle"])[0]["model_kind"] == "dalle"
    bundle = load_dalle(runs["masked"], "cpu")
    assert isinstance(bundle.model, MaskedDALLE) and bundle.kind == "masked"
    assert bundle.model.cfg.image_seq_len == 16 and bundle.model.cfg.image_fmap_size == 4
    logged = [json.loads(x) for x in (runs["masked"] / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss_img" in r for r in logged) and not any("eval/loss_text" in r for r in logged)
    assert (runs["masked"] / "samples_latest.png").is_file()
    assert json.loads((runs["masked"] / "config.json").read_text())["dalle"]["kind"] == "masked"
    g = generate(bundle, "一个大的红色圆形", 3, seed=4, batch_size=2, steps=3, cond_scale=2.0)
    h = generate(bundle, "一个大的红色圆形", 3, seed=4, batch_size=3, steps=3, cond_scale=2.0)
    assert g.images.shape == (3, 3, 16, 16) and torch.allclose(g.images, h.images, atol=1e-5)


def test_checkpoint_without_a_model_kind_is_autoregressive(runs, tmp_path):
    ck = max(runs["dalle"].glob("ckpt-*.pt"))
    obj = torch.load(ck, weights_only=True)
    del obj["meta"]["model_kind"]
    old = tmp_path / "ckpt-00000002.pt"
    torch.save(obj, old)
    bundle = load_dalle(old, "cpu")
    assert type(bundle.model) is DALLE and bundle.kind == "dalle"
    obj["meta"]["model_kind"] = "diffusion"
    torch.save(obj, old)
    with pytest.raises(UserError, match="unknown DALLE model kind"):
        load_dalle(old, "cpu")


def test_dalle_gen_with_a_masked_checkpoint(runs, tmp_path, cli_fast):
    ck = str(runs["masked"])
    args = ["--checkpoint", ck, "--batch-size", "2", "--seed", "3", "--cond-scale", "2", "--top-k", "8", "--quiet"]
    out = tmp_path / "gen"
    r = cli_fast("dalle_gen.py", "一个大的红色圆形", "5", str(out), *args, "--steps", "4")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "3.png", "4.png", "grid.png",
                                                      "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "masked" and meta["seeds"] == [3, 4, 5, 6, 7]
    assert meta["settings"]["steps"] == 4 and meta["settings"]["unmask_order"] == "confidence"
    # rerun: resumed (nothing made); other steps: another run
    r = cli_fast("dalle_gen.py", "一个大的红色圆形", "5", str(out), *args, "--steps", "4")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["reused"] == 5
    r = cli_fast("dalle_gen.py", "一个大的红色圆形", "5", str(out), *args, "--steps", "6")
    assert "holds the images of another run" in one_line_error(r)
    # the same images one at a time (batch size 1), and the default 12 steps recorded
    one = tmp_path / "one"
    r = cli_fast("dalle_gen.py", "一个大的红色圆形", "2", str(one), *args, "--steps", "4", "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    assert (one / "1.png").read_bytes() == (out / "1.png").read_bytes()
    seq = tmp_path / "seq"
    r = cli_fast("dalle_gen.py", "一个大的红色圆形", "2", str(seq), *args, "--unmask-order", "sequential")
    assert r.returncode == 0, r.stderr
    settings = json.loads((seq / "meta.json").read_text())["settings"]
    assert settings["steps"] == 12 and settings["unmask_order"] == "sequential"


def test_dalle_gen_refuses_masked_flags_for_an_ar_checkpoint(runs, tmp_path, cli_fast):
    for flag, value in (("--steps", "4"), ("--unmask-order", "sequential")):
        r = cli_fast("dalle_gen.py", "红色", "1", str(tmp_path / "x"), "--checkpoint", str(runs["dalle"]), flag, value)
        assert flag in one_line_error(r) and "autoregressive" in r.stderr
    assert not (tmp_path / "x").exists()
    r = cli_fast("dalle_gen.py", "红色", "1", str(tmp_path / "ar"), "--checkpoint", str(runs["dalle"]), "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "ar" / "meta.json").read_text())
    assert meta["kind"] == "dalle" and meta["settings"]["steps"] is None


def test_train_cli_refuses_an_unknown_kind(runs, cli_fast):
    r = cli_fast("-m", "dalle_train", "--kind", "diffusion", "--train-data", str(runs["root"] / "train_tokens.pt"))
    assert "--kind" in one_line_error(r)
