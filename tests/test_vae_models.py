"""vae_train models: taming checkpoint parity, strict loading, tokenizer contracts, DALLE-pytorch dVAE layout,
training."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vae_train.convert import load_vqgan, load_vqgan_with_loss_state, taming_loss_state, vqgan_config_from_yaml
from vae_train.dvae import DiscreteVAE, DVAEConfig
from vae_train.protocol import ImageTokenizer
from vae_train.quantizers import VectorQuantizer
from vae_train.vqgan import VQGAN, VQGANConfig
from zh_t2i_base.cli import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "taming_tiny"
CKPT, YAML = FIXTURE / "last.ckpt", FIXTURE / "model.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def taming_model() -> VQGAN:
    return load_vqgan(CKPT)


def tiny_vqgan_cfg(**kw) -> VQGANConfig:
    base = {"embed_dim": 8, "n_embed": 32, "z_channels": 8, "resolution": 16, "ch": 32, "ch_mult": (1, 1, 1),
            "num_res_blocks": 1, "attn_resolutions": (8,)}
    return VQGANConfig(**{**base, **kw})


def tiny_dvae_cfg(**kw) -> DVAEConfig:
    base = {"image_size": 16, "num_tokens": 32, "codebook_dim": 16, "num_layers": 2, "hidden_dim": 16}
    return DVAEConfig(**{**base, **kw})


def save_state(path: Path, state: dict, **extra) -> Path:
    torch.save({"state_dict": state, **extra}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# taming parity and loading


@pytest.mark.parametrize("side", [32, 48])
def test_taming_fixture_parity(taming_model: VQGAN, expected, side: int):
    images = expected[f"inputs_{side}"]
    indices = taming_model.encode(images)
    assert indices.dtype == torch.long and indices.shape == expected[f"indices_{side}"].shape
    assert torch.equal(indices, expected[f"indices_{side}"])
    decoded = taming_model.decode(expected[f"indices_{side}"])
    assert decoded.shape == (images.shape[0], 3, side, side)
    torch.testing.assert_close(decoded, expected[f"decoded_{side}"], atol=1e-4, rtol=0)


def test_taming_config_and_sizes(taming_model: VQGAN):
    cfg = vqgan_config_from_yaml(YAML)
    assert cfg == VQGANConfig(embed_dim=16, n_embed=64, z_channels=16, resolution=32, ch=32, ch_mult=(1, 2, 1),
                              num_res_blocks=1, attn_resolutions=(8,), quantizer="vq")
    assert not taming_model.training
    assert (taming_model.num_tokens, taming_model.image_size, taming_model.fmap_size, taming_model.seq_len) == (
        64, 32, 8, 64)
    assert isinstance(taming_model, ImageTokenizer)
    taming_model.image_size = 48
    try:
        assert (taming_model.fmap_size, taming_model.seq_len) == (12, 144)
    finally:
        taming_model.image_size = 32


def test_loss_keys_ignored_and_returned():
    model, loss_state = load_vqgan_with_loss_state(CKPT, YAML)
    assert set(loss_state) == {"loss.discriminator.main.0.weight", "loss.discriminator.main.0.bias", "loss.logvar"}
    assert loss_state["loss.discriminator.main.0.weight"].shape == (8, 3, 4, 4)
    assert not any(k.startswith("loss.") for k in model.state_dict())
    assert set(taming_loss_state(CKPT)) == set(loss_state)


def test_yaml_found_in_taming_log_layout(tmp_path: Path):
    run = tmp_path / "logs" / "2021-01-01T00-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    shutil.copy(CKPT, run / "checkpoints" / "last.ckpt")
    shutil.copy(YAML, run / "configs" / "model.yaml")
    assert load_vqgan(run / "checkpoints" / "last.ckpt").num_tokens == 64
    (run / "configs" / "model.yaml").unlink()
    with pytest.raises(UserError, match="no model.yaml"):
        load_vqgan(run / "checkpoints" / "last.ckpt")


def test_strict_load_reports_missing_and_unexpected(tmp_path: Path):
    state = torch.load(CKPT, weights_only=True)["state_dict"]
    missing = dict(state)
    del missing["encoder.mid.attn_1.q.weight"]
    with pytest.raises(UserError, match=r"missing keys: encoder\.mid\.attn_1\.q\.weight") as err:
        load_vqgan(save_state(tmp_path / "missing.ckpt", missing), YAML)
    assert "unexpected" not in str(err.value)

    extra = {**state, "decoder.up.0.attn.0.q.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"unexpected keys: decoder\.up\.0\.attn\.0\.q\.weight"):
        load_vqgan(save_state(tmp_path / "extra.ckpt", extra), YAML)

    # a bare state dict (no Lightning wrapper) loads too
    torch.save(state, tmp_path / "bare.pt")
    assert isinstance(load_vqgan(tmp_path / "bare.pt", YAML), VQGAN)


def test_wrong_config_is_a_user_error(tmp_path: Path):
    text = YAML.read_text()
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(text.replace("n_embed: 64", "n_embed: 32"))
    with pytest.raises(UserError, match=r"shape mismatch.*quantize\.embedding\.weight"):
        load_vqgan(CKPT, wrong)
    wrong.write_text(text.replace("taming.models.vqgan.VQModel", "taming.models.vqgan.EMAVQ"))
    with pytest.raises(UserError, match="not supported"):
        load_vqgan(CKPT, wrong)
    wrong.write_text("model: {target: taming.models.vqgan.VQModel, params: {embed_dim: 16, n_embed: 64}}")
    with pytest.raises(UserError, match="ddconfig"):
        vqgan_config_from_yaml(wrong)
    wrong.write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        vqgan_config_from_yaml(wrong)
    with pytest.raises(UserError, match="cannot read"):
        vqgan_config_from_yaml(tmp_path / "absent.yaml")


def test_bad_checkpoint_files(tmp_path: Path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_vqgan(garbage, YAML)
    with pytest.raises(UserError, match="not found"):
        load_vqgan(tmp_path / "absent.ckpt", YAML)
    torch.save({"state_dict": {"a": "not a tensor"}}, tmp_path / "odd.ckpt")
    with pytest.raises(UserError, match="state_dict"):
        load_vqgan(tmp_path / "odd.ckpt", YAML)


def test_pickled_checkpoint_needs_trust(tmp_path: Path):
    state = torch.load(CKPT, weights_only=True)["state_dict"]
    path = save_state(tmp_path / "lightning.ckpt", state, callbacks={"dirpath": pathlib.PurePosixPath("/logs")})
    with pytest.raises(UserError, match="trust_checkpoint=True"):
        load_vqgan(path, YAML)
    assert load_vqgan(path, YAML, trust_checkpoint=True).num_tokens == 64


def test_gumbel_vq_loads_from_taming_yaml(tmp_path: Path):
    text = YAML.read_text().replace("taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ")
    text = text.replace("    embed_dim: 16\n", "    kl_weight: 1.0e-08\n    embed_dim: 16\n")
    (tmp_path / "model.yaml").write_text(text)
    cfg = vqgan_config_from_yaml(tmp_path / "model.yaml")
    assert cfg.quantizer == "gumbel" and cfg.kl_weight == 1e-8
    torch.manual_seed(0)
    source = VQGAN(cfg)
    keys = set(source.state_dict())
    assert {"quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight"} <= keys
    assert "quantize.embedding.weight" not in keys
    model = load_vqgan(save_state(tmp_path / "last.ckpt", source.state_dict()))
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.encode(images), source.encode(images))


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer contracts


TOKENIZERS = {
    "dvae": lambda: DiscreteVAE(tiny_dvae_cfg()),
    "dvae_res": lambda: DiscreteVAE(tiny_dvae_cfg(num_resnet_blocks=1)),
    "vq": lambda: VQGAN(tiny_vqgan_cfg()),
    "gumbel": lambda: VQGAN(tiny_vqgan_cfg(quantizer="gumbel")),
}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_encode_decode_contract(name: str):
    torch.manual_seed(0)
    model = TOKENIZERS[name]()
    assert isinstance(model, ImageTokenizer)
    assert (model.image_size, model.fmap_size, model.seq_len) == (16, 4, 16)
    model.train()
    images = torch.rand(3, 3, 16, 16)
    indices = model.encode(images)
    assert model.training, "encode must restore the training flag"
    assert indices.dtype == torch.long and indices.shape == (3, model.seq_len)
    assert 0 <= int(indices.min()) and int(indices.max()) < model.num_tokens
    assert torch.equal(indices, model.encode(images)), "encode is deterministic"
    decoded = model.decode(indices)
    assert decoded.shape == images.shape and not decoded.requires_grad
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    # other resolutions, non-square grids
    wide = model.encode(torch.rand(1, 3, 16, 32))
    assert wide.shape == (1, 32)
    assert model.decode(wide, grid=(4, 8)).shape == (1, 3, 16, 32)
    with pytest.raises(ValueError, match="square"):
        model.decode(wide)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 16), 32))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.rand(1, 3, 18, 16))


# ---------------------------------------------------------------------------------------------------------------------
# DALLE-pytorch dVAE layout


def test_dvae_keys_match_dalle_pytorch_layout():
    cfg = DVAEConfig(num_tokens=512, codebook_dim=512, num_layers=3, num_resnet_blocks=0, hidden_dim=64)
    shapes = {k: tuple(v.shape) for k, v in DiscreteVAE(cfg).state_dict().items()}
    expected = {"codebook.weight": (512, 512), "encoder.3.weight": (512, 64, 1, 1), "encoder.3.bias": (512,),
                "decoder.3.weight": (3, 64, 1, 1), "decoder.3.bias": (3,)}
    for i in range(3):
        expected |= {f"encoder.{i}.0.weight": (64, 3 if i == 0 else 64, 4, 4), f"encoder.{i}.0.bias": (64,),
                     f"decoder.{i}.0.weight": (512 if i == 0 else 64, 64, 4, 4), f"decoder.{i}.0.bias": (64,)}
    assert shapes == expected

    keys = set(DiscreteVAE(DVAEConfig(num_resnet_blocks=1, hidden_dim=64)).state_dict())
    res = {f"{part}.{i}.net.{j}.{p}" for part, i in (("encoder", 3), ("decoder", 1)) for j in (0, 2, 4)
           for p in ("weight", "bias")}
    convs = {f"{part}.{i}.0.{p}" for part, idx in (("encoder", (0, 1, 2)), ("decoder", (2, 3, 4))) for i in idx
             for p in ("weight", "bias")}
    ends = {f"{k}.{p}" for k in ("encoder.4", "decoder.0", "decoder.5") for p in ("weight", "bias")}
    assert keys == {"codebook.weight"} | res | convs | ends
    assert DiscreteVAE(DVAEConfig(num_resnet_blocks=1)).state_dict()["decoder.0.weight"].shape == (64, 512, 1, 1)


def test_dvae_config_json_round_trip():
    cfg = tiny_dvae_cfg(norm_mean=(0.4, 0.5, 0.6))
    assert DVAEConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    vq = tiny_vqgan_cfg()
    assert VQGANConfig(**json.loads(json.dumps(vq.to_dict()))) == vq
    with pytest.raises(ValueError, match="power of two"):
        DVAEConfig(image_size=48)


# ---------------------------------------------------------------------------------------------------------------------
# training behaviour


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_vqgan_forward_and_gradient_through_quantizer(quantizer: str):
    torch.manual_seed(0)
    model = VQGAN(tiny_vqgan_cfg(quantizer=quantizer, kl_weight=1e-3)).train()
    images = torch.rand(2, 3, 16, 16)
    out = model(images)
    assert out.recon.shape == images.shape and out.indices.shape == (2, 16) and out.codebook_loss.ndim == 0
    torch.testing.assert_close(out.inputs, images * 2 - 1)
    assert model.last_layer() is model.decoder.conv_out.weight
    F.mse_loss(out.recon, out.inputs).backward()  # reconstruction only: gradient must cross the quantizer
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_dvae_gradient_through_hard_gumbel():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_dvae_cfg(straight_through=True)).train()
    loss, metrics, recon01 = model.loss(torch.rand(2, 3, 16, 16))
    assert set(metrics) == {"recon", "kl"} and recon01.shape == (2, 3, 16, 16)
    loss.backward()
    assert model.encoder[0][0].weight.grad.abs().sum() > 0


def test_vq_loss_weighting_follows_taming_legacy():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    for legacy, weight in ((True, 1.0), (False, 0.25)):
        vq = VectorQuantizer(8, 4, beta=0.25, legacy=legacy)
        z.grad = None
        _, loss, _ = vq(z)
        target = vq.lookup(vq(z)[2]).detach()
        torch.testing.assert_close(loss, 1.25 * F.mse_loss(z, target))
        loss.backward()
        torch.testing.assert_close(z.grad, weight * 2 * (z - target).detach() / z.numel())


def test_tiny_dvae_overfits_one_batch():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny_dvae_cfg(num_tokens=64, codebook_dim=32, hidden_dim=32, temperature=0.5))
    grid = torch.linspace(0, 1, 16)
    images = torch.stack([
        grid.view(1, 1, 16).expand(3, 16, 16), grid.view(1, 16, 1).expand(3, 16, 16),
        (grid.view(1, 16, 1) * grid.view(1, 1, 16)).expand(3, 16, 16), torch.rand(3, 4, 4).repeat_interleave(4, 1)
        .repeat_interleave(4, 2),
    ])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _, _ = model(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"dVAE overfit: mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}")
    assert last < 0.25 * first, (first, last)
