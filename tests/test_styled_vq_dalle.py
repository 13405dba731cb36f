"""Beyond the seed: DALLE over Styled-VQ's 36 ordered tokens, end to end through the same commands as the grid
tokenizers (stage 1 -> dump -> k-means -> attach -> `vae_train tokenize` -> `dalle_train` -> `dalle_gen.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dalle_train.generate import load_dalle
from form_data import synth
from form_data.tokenizer import build_vocab, read_captions

pytestmark = pytest.mark.slow  # an end-to-end run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("svq_dalle")
    synth.write_dataset(root / "data", n_train=64, n_val=8, image_size=32, progress=False)
    build_vocab(read_captions(root / "data" / "train_clip.csv"), root / "vocab.txt")
    return root


def test_dalle_trains_and_generates_over_styled_vq_tokens(data, cli):
    d, w = data / "data", data / "work"
    steps = [
        ["-m", "styled_vq", "--stage", "1", "--preset", "tiny36", "--train-data", str(d / "train_clip.csv"),
         "--out-dir", str(w / "s1"), "--max-steps", "3", "--batch-size", "8", "--workers", "0"],
        ["-m", "styled_vq", "dump", "--model", str(w / "s1"), "--data", str(d / "train_clip.csv"), "--out",
         str(w / "feats")],
        ["-m", "styled_vq", "kmeans", "--features", str(w / "feats"), "--k", "16", "--out", str(w / "cb.pt")],
        ["-m", "styled_vq", "attach", "--model", str(w / "s1"), "--codebook", str(w / "cb.pt"), "--out", str(w / "s2")],
        ["-m", "vae_train", "tokenize", "--tokenizer", str(w / "s2"), "--data", str(d / "train_clip.csv"), "--out",
         str(w / "train.pt"), "--workers", "0"],
        ["-m", "dalle_train", "--train-data", str(w / "train.pt"), "--vocab", str(data / "vocab.txt"), "--dim", "32",
         "--depth", "1", "--heads", "2", "--dim-head", "16", "--max-steps", "3", "--batch-size", "8", "--workers", "0",
         "--sample-images", "0", "--out-dir", str(w / "dalle")],
        ["dalle_gen.py", "一个大的红色圆形", "3", str(w / "gen"), "--checkpoint", str(w / "dalle"), "--quiet"],
    ]
    for args in steps:
        r = cli(*args)
        assert r.returncode == 0, f"{args[:3]}: {r.stderr[-1500:]}"
    bundle = load_dalle(w / "dalle", "cpu")
    cfg = bundle.model.cfg
    # gridless: 36 ordered tokens with 1D positions, 16 codes from the k-means codebook
    assert (cfg.image_seq_len, cfg.image_fmap_size, cfg.num_image_tokens) == (36, 0, 16)
    meta = json.loads((w / "gen" / "meta.json").read_text())
    assert meta["n"] == 3 and all((w / "gen" / f"{i}.png").is_file() for i in range(3))
