"""brivl_infer: full-size strict load, RoI numerics, masks, batching, loading errors, and parity with the original code.

The parity fixture (tests/fixtures/brivl_tiny/parity.npz) holds features computed by the ORIGINAL BriVL code in its
pinned environment (Python 3.8, torch 1.8.1, torchvision 0.9.1, timm 0.4.12, transformers 4.5.1; CPU) for the tiny
config, the fixture samples and the weights of :func:`det_state`; only that data is in the repo.
"""

from __future__ import annotations

import gzip
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from brivl_infer.encoder import BriVL
from brivl_infer.load import build_model, load_brivl, load_weights, read_checkpoint, read_config, resolve_encoder
from brivl_infer.model import roi_sample
from brivl_infer.preprocess import image_tensor, open_image, prepare_images, prepare_texts
from form_data.tokenizer import load_tokenizer
from zh_t2i_base.cli import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "brivl_tiny"
TINY_CFG = TINY / "brivl_tiny.yml"
FULL = FIXTURES / "brivl_full"

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def det_tensor(key: str, shape, dtype) -> torch.Tensor:
    """A reproducible pseudo-random tensor for checkpoint key ``key`` (integer hashing: identical everywhere)."""
    shape = tuple(shape)
    if dtype == torch.int64:
        if key.endswith("position_ids"):
            return torch.arange(int(np.prod(shape))).view(shape)
        return torch.zeros(shape, dtype=torch.int64)
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        x = (np.arange(n, dtype=np.uint64) + np.uint64(zlib.crc32(key.encode()))) * _M1
        x = (x ^ (x >> np.uint64(30))) * _M2
        x = (x ^ (x >> np.uint64(27))) * _M3
        x = x ^ (x >> np.uint64(31))
    u = 2 * ((x >> np.uint64(11)).astype(np.float64) / 2.0**53) - 1  # uniform in [-1, 1)
    name = key.rsplit(".", 1)[-1]
    if name == "running_var":
        v = 1.0 + 0.1 * u
    elif name == "running_mean":
        v = 0.01 * u
    elif len(shape) == 1 and name == "weight":  # BatchNorm / LayerNorm scale
        v = 1.0 + 0.1 * u
    elif len(shape) == 1:
        v = 0.01 * u
    else:  # He-style scale (4-d conv weights) or variance-preserving (linear / embedding)
        v = u * np.sqrt((6.0 if len(shape) == 4 else 3.0) / int(np.prod(shape[1:])))
    return torch.from_numpy(v.astype(np.float32)).view(shape)


def det_state(template: dict) -> dict[str, torch.Tensor]:
    """{key: det_tensor} for every key of a state dict."""
    return {k: det_tensor(k, v.shape, v.dtype) for k, v in template.items()}


def tiny_checkpoint_state(model: BriVL) -> dict[str, torch.Tensor]:
    """The full original layout for the tiny model: both encoders, ``position_ids`` and the ``_mom`` copies (zeros:
    loading them by mistake would show)."""
    state = det_state(model.state_dict())
    state["textencoder.backbone.bert.embeddings.position_ids"] = torch.arange(64)[None]
    state.update({k.replace("encoder.", "encoder_mom.", 1): torch.zeros_like(v) for k, v in list(state.items())})
    return state


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    cfg, _ = read_config(TINY_CFG)
    cfg.bert, _ = resolve_encoder(cfg.encoder, TINY)
    return tiny_checkpoint_state(build_model(cfg))


@pytest.fixture(scope="module")
def tiny(tiny_state) -> BriVL:
    """The tiny config with the parity weights (CPU, eval)."""
    cfg, _ = read_config(TINY_CFG)
    cfg.bert, vocab = resolve_encoder(cfg.encoder, TINY)
    model = build_model(cfg, load_tokenizer(vocab))
    load_weights(model, tiny_state)
    return model


def samples() -> list[dict]:
    return [json.loads(line) for line in (TINY / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# full size


def test_full_size_official_layout_loads_strictly():
    """Every key of the official checkpoint['learnable'] (random tensors of the listed shapes) loads into the model
    built from the official config; _mom keys are ignored; the model then embeds an image and a text."""
    rows = [line.split("\t") for line in gzip.decompress((FULL / "learnable_keys.tsv.gz").read_bytes())
            .decode().splitlines() if not line.startswith("#")]
    assert len(rows) == 2320
    cfg, _ = read_config(FULL / "test_xyb.yml")
    cfg.bert, vocab = resolve_encoder(cfg.encoder, FULL)
    assert vocab is None or (vocab / "vocab.txt").is_file() or (vocab / "tokenizer.json").is_file()
    model = build_model(cfg, load_tokenizer(vocab))
    assert sum(p.numel() for p in model.parameters()) == 273_818_904
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    listed = {k: tuple(json.loads(shape)) for k, shape, _, _ in rows if "_mom." not in k}
    assert set(listed) - set(own) == {"textencoder.backbone.bert.embeddings.position_ids"}
    assert all(own[k] == shape for k, shape in listed.items() if k in own)

    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype, _ in rows:
        shape = json.loads(shape)
        if "_mom." in key:  # never read: a zero-stride view costs no memory
            state[key] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
        elif key.endswith("position_ids"):
            state[key] = torch.arange(512).view(shape)
        elif dtype == "int64":
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.02
    load_weights(model, state)
    assert torch.equal(model.state_dict()["imgencoder.learnable.imgFC.fc1.weight"],
                       state["imgencoder.learnable.imgFC.fc1.weight"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8))
    v, t = model.encode_images([img]), model.encode_texts(["诺伍德大厅酒店位于阿伯丁"])
    assert v.shape == t.shape == (1, 2048)
    assert torch.allclose(v.norm(dim=1), torch.ones(1)) and torch.allclose(t.norm(dim=1), torch.ones(1))


# ---------------------------------------------------------------------------------------------------------------------
# numerics


def test_roi_sample_points_match_the_spec_test_vector():
    """Whole-image box on a 12x12 map (IMG_SIZE 380, 4x4 grid) samples at 1.136, 4.409, 7.682, 10.955 per axis; a
    zero padding box samples at -0.5 (0.5 * F[0] per axis); any box follows the original θ with align_corners=False."""
    h = w = 12
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    fmap = torch.stack([xs, ys, torch.ones(h, w)])[None]  # channels: x coordinate, y coordinate, ones
    boxes = torch.tensor([[[0, 0, 380, 380], [0, 0, 0, 0], [38, 76, 190, 300]]], dtype=torch.float32)
    out = roi_sample(fmap, boxes, img_size=380, grid_size=4)  # [1, 3 RoIs, 3 channels, 4, 4]
    expected = torch.tensor([1.136, 4.409, 7.682, 10.955])
    assert torch.allclose(out[0, 0, 0, 0], expected, atol=1e-3)  # x along a row
    assert torch.allclose(out[0, 0, 1, :, 0], expected, atol=1e-3)  # y down a column
    assert torch.allclose(out[0, 1, 2], torch.full((4, 4), 0.25))  # padding box: 0.5 x 0.5 of F[0] = 1
    assert torch.allclose(out[0, 1, :2], torch.zeros(2, 4, 4))

    # hand computation from the spec: r = 380/12, θ row = [(u2-u1)/(w-1), 0, (u1+u2-w+1)/(w-1)], p = ((xn+1)w-1)/2
    r = 380 / 12
    base = np.array([-0.75, -0.25, 0.25, 0.75])
    (u1, u2), (v1, v2) = (38 / r, 190 / r), (76 / r, 300 / r)
    px = (((u2 - u1) / (w - 1) * base + (u1 + u2 - w + 1) / (w - 1)) + 1) * w / 2 - 0.5
    py = (((v2 - v1) / (h - 1) * base + (v1 + v2 - h + 1) / (h - 1)) + 1) * h / 2 - 0.5
    assert np.allclose(out[0, 2, 0, 0].numpy(), px, atol=1e-4)
    assert np.allclose(out[0, 2, 1, :, 0].numpy(), py, atol=1e-4)


def original_image_embedding(model: BriVL, images: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor):
    """The original algorithm written out: per image, per-RoI grid_sample on N expanded copies, every slot through the
    transformer with the key-padding mask, masked mean, MLP, L2."""
    enc, cfg = model.imgencoder, model.config
    fmap = enc.backbone.forward_features(images)
    h, w = fmap.shape[2:]
    pooled = []
    for b in range(len(images)):
        x1, y1, x2, y2 = (boxes[b] / (cfg.img_size / h)).unbind(-1)
        zero = torch.zeros_like(x1)
        theta = torch.stack([(x2 - x1) / (w - 1), zero, (x1 + x2 - w + 1) / (w - 1),
                             zero, (y2 - y1) / (h - 1), (y1 + y2 - h + 1) / (h - 1)], 1).view(-1, 2, 3)
        n = boxes.shape[1]
        grid = F.affine_grid(theta, [n, fmap.shape[1], cfg.grid_size, cfg.grid_size], align_corners=False)
        s = F.grid_sample(fmap[b:b + 1].expand(n, -1, -1, -1), grid, align_corners=False)
        pooled.append(enc.learnable["max_pool"](s).flatten(1))
    x = F.normalize(torch.stack(pooled), dim=-1)
    x = enc.learnable["imgAtt"](x.transpose(0, 1), src_key_padding_mask=mask == 0).transpose(0, 1)
    x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(enc.learnable["imgFC"](x), dim=-1)


def test_image_padding_slots_are_masked_out(tiny):
    """Our batched, trimmed RoI path equals the original full-length masked computation, and whatever sits in the
    padded box slots does not change the embedding."""
    rows = samples()
    x, b, m = prepare_images([TINY / r["image_id"] for r in rows], [r["bbox"] for r in rows], tiny.config)
    assert m.sum(1).tolist() == [1, 3, 5, 2]
    with torch.inference_mode():
        ours = tiny.image_features(x, b, m)
        ref = original_image_embedding(tiny, x, b, m)
        garbage = b.clone()
        garbage[m == 0] = torch.tensor([3.0, 7.0, 90.0, 120.0])
        moved = tiny.image_features(x, garbage, m)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ours, moved, atol=1e-6)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the embeddings do depend on the input


def test_text_bert_sees_padding_but_the_head_masks_it(tiny):
    """BERT runs without an attention mask (as the original); textAtt and the mean use the real mask."""
    texts = ["一只小猫坐在红色的沙发上", "红色圆形"]
    ids, mask = prepare_texts(tiny.tokenizer, texts, tiny.config.max_text_len)
    assert mask.sum(1).tolist() == [14, 6] and ids[1, 5] == tiny.tokenizer.sep_id and ids[1, 6] == tiny.tokenizer.pad_id
    enc = tiny.textencoder

    def reference(bert_mask):
        hidden = enc.backbone.bert(input_ids=ids, attention_mask=bert_mask).last_hidden_state
        x = F.normalize(hidden, dim=-1)
        x = enc.learnable["textAtt"](x.transpose(0, 1), src_key_padding_mask=mask == 0).transpose(0, 1)
        x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(enc.learnable["textFC"](x), dim=-1)

    with torch.inference_mode():
        ours = tiny.text_features(ids, mask)
        unmasked, masked = reference(torch.ones_like(ids)), reference(mask.long())
    assert torch.allclose(ours, unmasked, atol=1e-6)
    assert (ours[1] - masked[1]).abs().max() > 1e-4  # passing the mask to BERT would be a different model


def test_box_order_does_not_matter(tiny):
    img = open_image(TINY / "images/b.png")
    boxes = np.array([[20, 10, 120, 90], [100, 50, 190, 140], [0, 0, 60, 70]])
    emb = tiny.encode_images([img, img, img], [boxes, boxes[[2, 0, 1]], boxes[:2]])
    assert torch.allclose(emb[0], emb[1], atol=1e-6)
    assert (emb[0] - emb[2]).abs().max() > 1e-4


def test_batch_equals_single_calls(tiny):
    rows = samples()
    paths, boxes = [TINY / r["image_id"] for r in rows], [r["bbox"] for r in rows]
    texts = [dict(r["sentences"])["sur_text"] for r in rows]
    batch_img, batch_text = tiny.encode_images(paths, boxes, batch_size=4), tiny.encode_texts(texts, batch_size=4)
    single_img = torch.cat([tiny.encode_images([p], [b]) for p, b in zip(paths, boxes, strict=True)])
    single_text = torch.cat([tiny.encode_texts([t]) for t in texts])
    assert torch.allclose(batch_img, single_img, atol=1e-5)
    assert torch.allclose(batch_text, single_text, atol=1e-5)
    scores = tiny.score(texts[1], paths, batch_size=3)  # whole-image boxes only
    whole = torch.cat([tiny.encode_images([p]) for p in paths])
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.allclose(scores, (whole @ single_text[1]).numpy(), atol=1e-6)


def test_parity_with_the_original_code(tiny):
    """Same token ids, boxes, masks and features (to 1e-5) as the original code on the same files and weights."""
    ref = np.load(TINY / "parity.npz")
    rows = samples()
    texts = [dict(r["sentences"])["sur_text"] for r in rows]
    ids, text_mask = prepare_texts(tiny.tokenizer, texts, tiny.config.max_text_len)
    assert np.array_equal(ids.numpy(), ref["input_ids"])
    assert np.array_equal(text_mask.sum(1).numpy(), ref["text_lens"])
    paths, boxes = [TINY / r["image_id"] for r in rows], [r["bbox"] for r in rows]
    _, b, m = prepare_images(paths, boxes, tiny.config)
    assert np.array_equal(b.numpy(), ref["boxes"]) and np.array_equal(m.sum(1).numpy(), ref["img_lens"])
    img, text = tiny.encode_images(paths, boxes).numpy(), tiny.encode_texts(texts).numpy()
    assert np.abs(img - ref["np_img"]).max() < 1e-5
    assert np.abs(text - ref["np_text"]).max() < 1e-5
    assert np.abs(ref["np_img"][0] - ref["np_img"][1]).max() > 1e-3  # the fixture is not degenerate


def test_preprocessing_matches_torchvision_without_antialias():
    """ToTensor -> Resize((S, S)) on a tensor without antialias -> Normalize; alpha is dropped, not composited."""
    from torchvision import transforms

    rgba = Image.open(TINY / "images/c.png")
    assert rgba.mode == "RGBA"
    img = open_image(TINY / "images/c.png")
    assert np.array_equal(np.asarray(img), np.asarray(rgba)[..., :3])
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    tv = transforms.Compose([transforms.ToTensor(), transforms.Resize((96, 96), antialias=False),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ours = image_tensor(big, 96)
    assert torch.allclose(ours, tv(big), atol=1e-6)
    smooth = transforms.Resize((96, 96), antialias=True)(transforms.ToTensor()(big))
    assert (ours - transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(smooth)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------------
# loading


def test_load_brivl_loads_checkpoint_files(tiny, tiny_state, tmp_path):
    """{'learnable': ...} with _mom copies and position_ids, and a bare state dict, give the same model."""
    state = tiny_state
    torch.save({"learnable": state, "epoch": 3}, tmp_path / "full.pth")
    torch.save({k: v for k, v in state.items() if "_mom." not in k}, tmp_path / "bare.pt")
    model = load_brivl(TINY_CFG, tmp_path / "full.pth")
    img = [TINY / "images/a.png"]
    assert torch.allclose(model.encode_images(img), tiny.encode_images(img), atol=1e-6)
    assert torch.allclose(model.encode_texts(["红色圆形"]), tiny.encode_texts(["红色圆形"]), atol=1e-6)
    bare, full = read_checkpoint(tmp_path / "bare.pt"), read_checkpoint(tmp_path / "full.pth")
    assert bare.keys() < full.keys() and all(torch.equal(v, full[k]) for k, v in bare.items())
    from_bare = load_brivl(TINY_CFG, tmp_path / "bare.pt")
    assert torch.equal(from_bare.encode_images(img), model.encode_images(img))
    # load_brivl folds the CNN's BatchNorms (inference only): loading weights again is refused in one line
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.imgencoder.backbone.modules())
    with pytest.raises(UserError, match="folded"):
        load_weights(model, bare)


def test_checkpoint_mismatches_name_the_keys(tiny, tiny_state):
    state = tiny_state
    missing = {k: v for k, v in state.items() if k != "imgencoder.learnable.imgFC.fc2.bias"}
    with pytest.raises(UserError, match=r"missing keys 1 \(imgencoder.learnable.imgFC.fc2.bias\)"):
        load_weights(tiny, missing)
    with pytest.raises(UserError, match=r"unexpected keys 1 \(textencoder.extra.weight\)"):
        load_weights(tiny, {**state, "textencoder.extra.weight": torch.zeros(1)})
    with pytest.raises(UserError, match=r"shape mismatches 1 \(imgencoder.learnable.imgFC.fc2.bias \(7,\)"):
        load_weights(tiny, {**state, "imgencoder.learnable.imgFC.fc2.bias": torch.zeros(7)})
    with pytest.raises(UserError, match="position_ids is not 0, 1, 2"):
        load_weights(tiny, {**state, "textencoder.backbone.bert.embeddings.position_ids": torch.zeros(1, 64).long()})
    with pytest.raises(UserError, match="no imgencoder"):
        load_weights(tiny, {"model.weight": torch.zeros(1)})


def test_pickled_checkpoint_needs_trust(tiny_state, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"learnable": tiny_state, "args": Path("x")}, path)
    with pytest.raises(UserError, match="--trust-checkpoint"):
        read_checkpoint(path)
    assert "imgencoder.learnable.imgFC.fc1.weight" in read_checkpoint(path, trust_checkpoint=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")


def write_cfg(tmp_path: Path, **changes) -> Path:
    text = TINY_CFG.read_text(encoding="utf-8")
    for key, value in changes.items():
        text = "\n".join(f"    {key}: {value}" if line.strip().startswith(f"{key}:") else line
                         for line in text.splitlines())
    path = tmp_path / "cfg.yml"
    path.write_text(text.replace("ENCODER: 'bert'", f"ENCODER: '{TINY / 'bert'}'"), encoding="utf-8")
    return path


@pytest.mark.parametrize("changes, message", [
    ({"CNN": "'no_such_net'"}, "MODEL.CNN 'no_such_net' is not a timm model name"),
    ({"IMG_FEATURE_DIM": 512}, "MODEL.IMG_FEATURE_DIM is 512 but tf_efficientnet_b0_ns gives 1280"),
    ({"TEXT_FEATURE_DIM": 48}, "MODEL.TEXT_FEATURE_DIM is 48 but the BERT"),
    ({"IMG_TRANSFORMER_HEAD": 3}, "not divisible by MODEL.IMG_TRANSFORMER_HEAD 3"),
    ({"ENCODER": "'nobody/unknown-bert'"}, "not in the local Hugging Face cache"),
    ({"MAX_IMG_LEN": "'many'"}, "MODEL.MAX_IMG_LEN must be int"),
    ({"NAME": "'VL_large'"}, "MODEL.NAME 'VL_large' is not supported"),
    ({"IMG_SIZE": 48}, "MODEL.IMG_SIZE 48 gives tf_efficientnet_b0_ns a feature map under 2x2"),
])
def test_bad_configs_are_one_line_user_errors(tmp_path, changes, message):
    (tmp_path / "unused.pth").write_bytes(b"never read: the config fails first")
    with pytest.raises(UserError, match=message):
        load_brivl(write_cfg(tmp_path, **changes), tmp_path / "unused.pth")


def test_config_variants_and_unknown_keys(tmp_path):
    """Other sizes are honoured; an unknown key is reported, not fatal; DATASET.JSONPATH is relative to the yml."""
    path = write_cfg(tmp_path, MAX_TEXT_LEN=24, MAX_IMG_LEN=9, GRID_SIZE=3, IMG_SIZE=96)
    path.write_text(path.read_text().replace("    IS_EXTRACT: True", "    IS_EXTRACT: True\n    NEW_THING: 3"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, data = read_config(path)
    assert any("NEW_THING" in str(w.message) for w in caught)
    assert (cfg.max_text_len, cfg.max_img_len, cfg.grid_size, cfg.img_size) == (24, 9, 3, 96)
    assert data.jsonpath == str(tmp_path / "samples.jsonl") and data.workers == 0
    cfg.bert, vocab = resolve_encoder(cfg.encoder, tmp_path)
    model = build_model(cfg, load_tokenizer(vocab))
    _, b, m = prepare_images([TINY / "images/a.png"], [[[1, 2, 3, 4]] * 20], cfg)
    assert b.shape == (1, 9, 4) and m.sum() == 9 and b[0, 8].tolist() == [0, 0, 96, 96]
    long_text = "春天的公园里开满了花，孩子们在草地上放风筝，老人们坐在长椅上聊天。"
    ids, mask = prepare_texts(model.tokenizer, [long_text], 24)
    assert ids.shape == (1, 24) and mask.sum() == 24 and ids[0, -1] == model.tokenizer.sep_id
    assert model.encode_images([TINY / "images/a.png"], [[[1, 2, 30, 40]]]).shape == (1, 1280)


def test_reduced_precision_autocast(tiny):
    """fp16 / bf16 run the towers under autocast and return float32 unit rows close to fp32."""
    imgs = [TINY / f"images/{n}.png" for n in "abcd"]
    ref_img, ref_text = tiny.encode_images(imgs), tiny.encode_texts(["红色圆形"])
    try:
        for precision in ("bf16", "fp16"):
            tiny.precision = precision
            img, text = tiny.encode_images(imgs), tiny.encode_texts(["红色圆形"])
            assert img.dtype == text.dtype == torch.float32
            assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)
            assert 0 < (img - ref_img).abs().max() < 5e-3 and (text - ref_text).abs().max() < 5e-3
    finally:
        tiny.precision = "fp32"
    with pytest.raises(UserError, match="precision must be one of fp32, fp16, bf16"):
        build_model(tiny.config, precision="fp8")
