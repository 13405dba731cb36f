"""The scorer registry and the Chinese-CLIP scorer (a tiny cn_clip architecture with weights trained here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image, ImageDraw

from zh_t2i_base.cli import UserError
from zh_t2i_rerank import brivl
from zh_t2i_rerank.cnclip import cnclip_model_info
from zh_t2i_rerank.registry import SCORERS, make_scorer, split_spec

cn = pytest.importorskip("cn_clip.clip")

# cn_clip's config layout (ResNet stage depths as a string, as its RN50.json has them), scaled down
TINY_ARCH = {"embed_dim": 32, "image_resolution": 32, "vision_layers": "[1,1,1,1]", "vision_width": 16,
             "vision_patch_size": None,
             "vocab_size": 21128, "text_attention_probs_dropout_prob": 0.0, "text_hidden_act": "gelu",
             "text_hidden_dropout_prob": 0.0, "text_hidden_size": 32, "text_initializer_range": 0.02,
             "text_intermediate_size": 64, "text_max_position_embeddings": 64, "text_num_attention_heads": 2,
             "text_num_hidden_layers": 1, "text_type_vocab_size": 2}
CAPTIONS = ("红色圆形", "蓝色正方形")


def shape_image(kind: int, seed: int) -> Image.Image:
    """Red circle (0) or blue square (1) at a random place on a light background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(200, 255, 3)))
    x, y = (int(v) for v in rng.integers(4, 24, 2))
    draw = ImageDraw.Draw(img)
    if kind == 0:
        draw.ellipse([x, y, x + 20, y + 20], fill=(220, 30, 30))
    else:
        draw.rectangle([x, y, x + 20, y + 20], fill=(30, 60, 220))
    return img


@pytest.fixture(scope="module")
def cnclip_files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny cn_clip model trained briefly to tell the two captions' images apart; weights saved as cn_clip does
    (``{"state_dict": ...}`` with DDP's ``module.`` prefix)."""
    from cn_clip.clip.model import CLIP

    root = tmp_path_factory.mktemp("cnclip")
    arch = root / "tiny.json"
    arch.write_text(json.dumps(TINY_ARCH), encoding="utf-8")
    torch.manual_seed(0)
    model = CLIP(**cnclip_model_info(str(arch)))
    preprocess = cn.image_transform(32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = ClipLoss()
    text = cn.tokenize(list(CAPTIONS))
    for step in range(80):  # one red circle and one blue square per batch: no duplicate pairs
        images = torch.stack([preprocess(shape_image(kind, 2 * step + kind)) for kind in (0, 1)])
        loss = loss_fn(*model(images, text))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    weights = root / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    return arch, weights


def test_registry_has_the_three_scorers_and_splits_specs():
    assert set(SCORERS) == {"clip", "cnclip", "brivl"}
    assert SCORERS["brivl"] is brivl
    assert split_spec("cnclip:ViT-B-16:/w/clip_cn_vit-b-16.pt") == ("cnclip", ["ViT-B-16", "/w/clip_cn_vit-b-16.pt"])
    assert split_spec("brivl:cfg.yml:brivl.pth") == ("brivl", ["cfg.yml", "brivl.pth"])
    with pytest.raises(UserError, match="unknown scorer 'blip'"):
        split_spec("blip:x")
    with pytest.raises(UserError, match="expected clip:CKPT"):
        make_scorer("clip")


def test_scorer_list_is_written_once():
    """clip_sort.py's docstring, --help and the unknown-scorer error all come from the registry's table."""
    import clip_sort
    from zh_t2i_rerank.registry import USAGE

    helptext = " ".join(clip_sort.parser().format_help().split())
    doc = " ".join(clip_sort.__doc__.split())
    for name, module in SCORERS.items():
        assert module.USAGE.startswith(f"{name}:") and module.USAGE in USAGE
        assert f"{module.USAGE} {module.HELP}" in doc
        assert module.USAGE in helptext and " ".join(module.HELP.split()) in helptext
        assert callable(module.make_scorer)
    with pytest.raises(UserError) as err:
        split_spec("nope:x")
    assert USAGE in str(err.value)


def test_cnclip_scorer_ranks_the_matching_image_first(cnclip_files):
    arch, weights = cnclip_files
    scorer = make_scorer(f"cnclip:{arch}:{weights}", device="cpu", batch_size=3)
    images = [shape_image(i % 2, 1000 + i) for i in range(7)]
    red, blue = scorer.score(CAPTIONS[0], images), scorer.score(CAPTIONS[1], images)
    assert red.shape == blue.shape == (7,) and np.isfinite(red).all() and np.isfinite(blue).all()
    reds, blues = red[0::2], red[1::2]
    assert reds.min() > blues.max()  # every red circle above every blue square for "红色圆形"
    assert blue[1::2].min() > blue[0::2].max()
    single = make_scorer(f"cnclip:{arch}:{weights}", device="cpu", batch_size=1).score(CAPTIONS[0], images)
    np.testing.assert_allclose(single, red, atol=1e-5)


def test_cnclip_named_architectures_resolve_offline():
    info = cnclip_model_info("RN50")
    assert info["vision_layers"] == [3, 4, 6, 3] and info["text_num_hidden_layers"] == 3
    assert cnclip_model_info("ViT-B-16@RBT3-chinese")["vision_patch_size"] == 16
    with pytest.raises(UserError, match="unknown cnclip architecture 'ViT-Q-99'"):
        cnclip_model_info("ViT-Q-99")


def test_cnclip_weight_errors(cnclip_files, tmp_path):
    arch, weights = cnclip_files
    other = tmp_path / "wide.json"
    other.write_text(json.dumps({**TINY_ARCH, "embed_dim": 48}), encoding="utf-8")
    with pytest.raises(UserError, match="weights do not match cnclip architecture"):
        make_scorer(f"cnclip:{other}:{weights}", device="cpu")
    with pytest.raises(UserError, match="cnclip weights not found"):
        make_scorer(f"cnclip:{arch}:{tmp_path / 'none.pt'}", device="cpu")
    pickled = tmp_path / "pickled.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1e-4)}, pickled)  # as training scripts often save
    with pytest.raises(UserError, match="--trust-checkpoint"):
        make_scorer(f"cnclip:{arch}:{pickled}", device="cpu")
    scores = make_scorer(f"cnclip:{arch}:{pickled}", device="cpu", trust_checkpoint=True).score(
        CAPTIONS[0], [shape_image(0, 1), shape_image(1, 2)])
    assert scores[0] > scores[1]


def test_brivl_scorer_comes_through_the_registry(tmp_path):
    with pytest.raises(UserError, match="none.yml"):  # brivl_infer's factory was found and checked its paths
        make_scorer(f"brivl:{tmp_path / 'none.yml'}:{tmp_path / 'none.pth'}", device="cpu")
