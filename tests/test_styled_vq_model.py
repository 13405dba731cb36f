"""Styled-VQ model: shapes (v1/v2, tiny presets), the original's full size, bottlenecks, adaptive LN, quantisation
with the straight-through estimator, encode/decode round trip, and the strict import of original checkpoints with
numerical parity against the original code (tests/fixtures/styled_vq_orig)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from styled_vq.convert import from_original, load_original_state
from train_runtime.optim import param_groups
from vae_train.load import build_tokenizer
from vae_train.styled import AdaLayerNorm, StyledVQ, StyledVQConfig, count_parameters, preset
from zh_t2i_base.cli import UserError

FIXTURE = REPO / "tests" / "fixtures" / "styled_vq_orig"
SMALL = {"image_size": 16, "patch_size": 4, "width": 32, "heads": 2, "dense_blocks": 1, "expert_blocks": 1,
         "cond_blocks": 4, "emb_dim": 8, "decoder_width": 32, "final_blocks": 1, "refiner_channels": 8,
         "refiner_groups": 2, "refiner_kernel": 5, "codebook_size": 16}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", ["tiny36", "micro8"])
def test_shapes_of_tiny_presets(version, name):
    torch.manual_seed(0)
    model = StyledVQ(preset(name, version=version))
    t = 36 if name == "tiny36" else 8
    assert model.seq_len == t and model.fmap_size == 0 and model.image_size == 32
    images = torch.rand(2, 3, 32, 32)
    z = model.encode_continuous(images)
    assert z.shape == (2, t, 16)
    recon, z2, idx = model(images)
    assert recon.shape == (2, 3, 32, 32) and idx is None and torch.equal(z, z2)
    out = model.decode_continuous(z)
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    if version == "v1":
        assert torch.allclose(z.norm(dim=-1), torch.ones(2, t), atol=1e-5)  # on the unit sphere
    else:  # LayerNorm output (affine at its initial identity)
        assert torch.allclose(z.mean(-1), torch.zeros(2, t), atol=1e-5)


def test_full_size_matches_the_original_parameter_counts():
    with torch.device("meta"):
        v2 = StyledVQ(StyledVQConfig())
        v1 = StyledVQ(StyledVQConfig(version="v1"))
    experts = sum(p.numel() for b in v2.encoder.expert_blocks for p in b.parameters())
    # spec: encoder 2,116.6 M (experts 1,888.6 M), decoder 213.6 M without the unused condition_linear (v1: 245.4 M
    # with it = 234.8 M without), bridge 0.116 M
    assert round(count_parameters(v2.encoder) / 1e5) == 21166 and round(experts / 1e5) == 18886
    assert round(count_parameters(v2.decoder) / 1e5) == 2136 and round(count_parameters(v1.decoder) / 1e5) == 2348
    assert round((count_parameters(v2.bottleneck) + count_parameters(v2.up_proj)) / 1e3) == 116
    assert v2.seq_len == 36 and v2.num_tokens == 194_560
    assert [round(count_parameters(StyledVQ(preset(n))) / 1e4) for n in ("tiny36", "micro8")] == [262, 75]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        StyledVQConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="odd"):
        StyledVQConfig(refiner_kernel=4)
    with pytest.raises(ValueError, match="version"):
        StyledVQConfig(version="v3")
    with pytest.raises(ValueError, match="v1 bottleneck only"):
        StyledVQConfig(noise=0.1)
    with pytest.raises(ValueError, match="unknown Styled-VQ preset"):
        preset("huge")


def test_weight_decay_only_on_matrices_and_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    model = StyledVQ(StyledVQConfig(**SMALL))
    model.set_codebook(torch.randn(16, 8))
    decay, keep = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert {"encoder.cls_embed", "encoder.pos_embed", "encoder.query_embed", "bottleneck.proto_embed",
            "decoder.pos_embed", "encoder.expert_blocks.0.experts.fc_bias"} <= kept
    assert all(names[id(p)].endswith(("weight",)) and p.ndim >= 2 for p in decay["params"])
    assert "codebook" not in kept | {names[id(p)] for p in decay["params"]}  # frozen: in no optimizer group
    images = torch.rand(2, 3, 16, 16)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        model(images, quantize=True)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_adaptive_layer_norm_scales_by_alpha_not_one_plus_alpha():
    norm = AdaLayerNorm(8)
    torch.nn.init.zeros_(norm.linear.weight)
    with torch.no_grad():
        norm.linear.bias.copy_(torch.cat([torch.full((8,), 0.5), torch.zeros(8)]))  # alpha = 0.5, beta = 0
    x = torch.randn(2, 5, 8)
    expected = 0.5 * torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.allclose(norm(x, torch.randn(2, 8)), expected, atol=1e-6)


def test_v1_noise_is_multiplicative_and_only_in_training():
    torch.manual_seed(0)
    model = StyledVQ(StyledVQConfig(**SMALL, version="v1", noise=0.5))
    images = torch.rand(2, 3, 16, 16)
    model.eval()
    a, b = model(images)[1], model(images)[1]
    assert torch.equal(a, b) and torch.equal(a, model.encode_continuous(images))
    model.train()
    torch.manual_seed(1)
    noisy = model(images)[1]
    clean = model.encode_continuous(images)
    ratio = noisy / clean  # z_j = mu_j (1 + s eps_j): the ratio's spread is s
    assert not torch.equal(noisy, clean) and 0.3 < float((ratio - 1).detach().std()) < 0.7


def test_quantize_straight_through_and_round_trip():
    torch.manual_seed(0)
    model = StyledVQ(StyledVQConfig(**SMALL)).eval()
    images = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match="no codebook yet"):
        model.encode(images)
    z = model.encode_continuous(images).detach()
    # a codebook holding the exact tokens of the images (plus far-away rows): encode -> decode is the continuous path
    codebook = torch.cat([z.reshape(-1, 8), 50 + torch.randn(8, 8)])
    model.set_codebook(codebook)
    assert model.num_tokens == 32 and model.codebook.requires_grad is False
    idx = model.encode(images)
    assert idx.shape == (3, 8) and idx.dtype == torch.long
    assert torch.equal(idx.flatten(), torch.arange(24))
    assert torch.allclose(model.decode(idx), model.decode_continuous(z), atol=1e-6)
    # brute-force nearest entries for random tokens
    q = torch.randn(4, 8, 8)
    entries, ind = model.quantize(q)
    assert torch.equal(ind, torch.cdist(q.reshape(-1, 8), codebook).argmin(1).view(4, 8))
    assert torch.equal(entries, codebook[ind])
    # straight-through: the gradient reaches the encoder, the codebook gets none
    model.train()
    recon, _, idx = model(images, quantize=True)
    recon.mean().backward()
    assert idx.shape == (3, 8) and model.encoder.proj.weight.grad.abs().sum() > 0 and model.codebook.grad is None
    with pytest.raises(ValueError, match="indices must lie"):
        model.decode(torch.full((1, 8), 32))


def test_from_checkpoint_round_trip():
    torch.manual_seed(0)
    model = StyledVQ(StyledVQConfig(**SMALL))
    model.set_codebook(torch.randn(16, 8))
    again = StyledVQ.from_checkpoint(model.checkpoint_meta(), model.state_dict())
    images = torch.rand(2, 3, 16, 16)
    assert not again.training and torch.equal(again.encode(images), model.encode(images))
    stage1 = StyledVQ(StyledVQConfig(**SMALL))
    assert not StyledVQ.from_checkpoint(stage1.checkpoint_meta(), stage1.state_dict()).has_codebook
    with pytest.raises(UserError, match="do not match"):
        build_tokenizer(stage1.checkpoint_meta(), {"x": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------------
# original checkpoints


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_from_original_strict_load_matches_the_original_code(version):
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    images, ref = expected["images"], expected[version]
    model = from_original(FIXTURE / f"original_{version}.pt", heads=4, refiner_groups=2, codebook="embedded")
    assert model.cfg.version == version and model.seq_len == 6 and model.num_tokens == 16 and not model.training
    with torch.no_grad():
        z = model.encode_continuous(images)
        assert torch.allclose(z, ref["tokens"], atol=1e-5)
        assert torch.allclose(model.decode_raw(z), ref["raw_decoded"], atol=1e-5)
        assert torch.allclose(model.decode_continuous(z), ref["decoded"], atol=1e-5)
    idx = model.encode(images)
    assert torch.equal(idx, ref["indices"])
    assert torch.allclose(model.decode(idx), ref["decoded_quantized"], atol=1e-5)
    stage1 = from_original(FIXTURE / f"original_{version}.pt", version, heads=4, refiner_groups=2)
    assert not stage1.has_codebook  # the stored table is not trusted unless asked for


def test_from_original_rejects_mismatches(tmp_path):
    path = FIXTURE / "original_v2.pt"
    with pytest.raises(UserError, match="does not match a v1 model"):
        from_original(path, "v1", heads=4, refiner_groups=2)
    state = {"module." + k: v for k, v in load_original_state(path).items()}
    extra = tmp_path / "extra.pt"
    torch.save({**state, "module.decoder.surprise.weight": torch.zeros(2)}, extra)
    with pytest.raises(UserError, match="surprise"):
        from_original(extra, heads=4, refiner_groups=2)
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "module.decoder.resblocks.1.ln_22.weight"}, missing)
    with pytest.raises(UserError, match="cond_blocks.1.cond_norms.1.weight"):
        from_original(missing, heads=4, refiner_groups=2)
    with pytest.raises(UserError, match="heads"):
        from_original(path, heads=5, refiner_groups=2)  # 32 is not divisible by 5
    with pytest.raises(UserError, match="not found"):
        from_original(tmp_path / "nope.pt")
