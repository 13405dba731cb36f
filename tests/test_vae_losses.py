"""Tests of vae_train's losses (taming-compatible VQGAN loss) and vae_train.metrics (PSNR, SSIM, codebook usage)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import vgg16

from vae_train.discriminator import NLayerDiscriminator
from vae_train.lpips import LPIPS, lpips_available
from vae_train.metrics import RunningStats, codebook_usage, psnr, ssim, to_unit_range
from vae_train.vqgan_loss import VQGANLoss, adopt_weight, hinge_d_loss, vanilla_d_loss

# taming's NLayerDiscriminator(n_layers=3) state-dict keys, BatchNorm variant
TAMING_DISC_KEYS = [
    "main.0.weight", "main.0.bias",
    "main.2.weight",
    "main.3.weight", "main.3.bias", "main.3.running_mean", "main.3.running_var", "main.3.num_batches_tracked",
    "main.5.weight",
    "main.6.weight", "main.6.bias", "main.6.running_mean", "main.6.running_var", "main.6.num_batches_tracked",
    "main.8.weight",
    "main.9.weight", "main.9.bias", "main.9.running_mean", "main.9.running_var", "main.9.num_batches_tracked",
    "main.11.weight", "main.11.bias",
]  # fmt: skip


def images(seed: int, b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------------------------------
# discriminator
# --------------------------------------------------------------------------------------------------------------------


def test_discriminator_keys_shapes_and_init():
    disc = NLayerDiscriminator()
    keys = list(disc.state_dict())
    print(keys)
    assert keys == TAMING_DISC_KEYS
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4)
    assert shapes["main.2.weight"] == (128, 64, 4, 4)
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    # taming's weights_init: conv N(0, 0.02), BatchNorm N(1, 0.02) / 0
    assert abs(disc.main[8].weight.std().item() - 0.02) < 0.002
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 0.01
    assert torch.all(disc.main[9].bias == 0)
    # a 64x64 input: 32 -> 16 -> 8 -> 7 -> 6 patch logits
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_patchgan_30x30_and_actnorm_keys():
    assert NLayerDiscriminator(ndf=8)(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    act = NLayerDiscriminator(ndf=8, use_actnorm=True)
    keys = list(act.state_dict())
    assert keys[:6] == ["main.0.weight", "main.0.bias", "main.2.weight", "main.2.bias", "main.3.loc", "main.3.scale"]
    assert "main.3.initialized" in keys
    out = act(torch.randn(4, 3, 32, 32))  # data-dependent init on the first training batch
    assert act.main[3].initialized.item() == 1 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------------
# GAN formulas, adaptive weight, gating
# --------------------------------------------------------------------------------------------------------------------


def test_hinge_and_vanilla_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))

    def sp(v: float) -> float:
        return math.log1p(math.exp(v))

    expected = 0.5 * (np.mean([sp(-2.0), sp(-0.5), sp(1.0)]) + np.mean([sp(-2.0), sp(0.0), sp(1.0)]))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert adopt_weight(0.7, 9, threshold=10) == 0.0 and adopt_weight(0.7, 10, threshold=10) == 0.7


class ToyDecoder(nn.Module):
    """A last conv producing [-1, 1] images: its weight plays the decoder's last layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(h))


def test_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    loss = VQGANLoss(disc_start=0, disc_ndf=8, disc_weight=0.8, codebook_weight=0.5)
    dec = ToyDecoder()
    x, h = images(1), torch.randn(2, 4, 32, 32)
    recon = dec(h)
    cb = torch.tensor(0.3)
    total, logs = loss.generator_loss(x, recon, cb, step=5, last_layer=dec.conv.weight)

    nll = (x - recon).abs().mean()
    g = -loss.discriminator(recon).mean()
    gn = torch.autograd.grad(nll, dec.conv.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv.weight, retain_graph=True)[0].norm()
    expected = (gn / (gg + 1e-4)).clamp(0, 1e4).item() * 0.8
    assert logs["d_weight"] == pytest.approx(expected, rel=1e-4)
    assert logs["disc_factor"] == 1.0 and logs["p"] == 0.0
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-6) and logs["rec"] == pytest.approx(nll.item(), rel=1e-6)
    assert logs["total"] == pytest.approx(nll.item() + expected * g.item() + 0.5 * 0.3, rel=1e-4)
    assert set(logs) == {"total", "nll", "rec", "p", "g", "d_weight", "disc_factor", "codebook"}
    assert all(isinstance(v, float) for v in logs.values())
    total.backward()  # the graph is intact after the two autograd.grad calls
    assert dec.conv.weight.grad is not None

    loss.eval()  # not training: no adaptive weight, GAN term contributes nothing
    with torch.no_grad():
        _, eval_logs = loss.generator_loss(x, dec(h), cb, step=5)
    assert eval_logs["d_weight"] == 0.0 and eval_logs["total"] == pytest.approx(nll.item() + 0.15, rel=1e-5)


def test_disc_start_gating():
    loss = VQGANLoss(disc_start=100, disc_ndf=8, codebook_weight=1.0)
    dec = ToyDecoder()
    x, recon = images(2), dec(torch.randn(2, 4, 32, 32))
    calls = []
    loss.discriminator.register_forward_hook(lambda *a: calls.append(1))
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.2), step=99, last_layer=dec.conv.weight)
    assert calls == [] and logs["disc_factor"] == 0.0 and logs["g"] == 0.0 and logs["d_weight"] == 0.0
    assert total.item() == pytest.approx((x - recon).abs().mean().item() + 0.2, rel=1e-6)

    d_loss, d_logs = loss.discriminator_loss(x, recon, step=99)
    assert d_loss.item() == 0.0 and d_logs["disc_factor"] == 0.0
    d_loss.backward()  # still a valid graph (zero gradients)

    d_loss, d_logs = loss.discriminator_loss(x, recon, step=100)
    logits_real, logits_fake = loss.discriminator(x), loss.discriminator(recon.detach())
    assert d_loss.item() == pytest.approx(hinge_d_loss(logits_real, logits_fake).item(), rel=1e-3)
    assert set(d_logs) == {"disc_loss", "logits_real", "logits_fake", "disc_factor"}
    _, logs = loss.generator_loss(x, recon, torch.tensor(0.2), step=100, last_layer=dec.conv.weight)
    assert logs["disc_factor"] == 1.0 and logs["d_weight"] > 0 and logs["g"] != 0.0


def test_gan_off_is_pure_l1_plus_codebook():
    loss = VQGANLoss(gan=False, codebook_weight=0.25, pixel_weight=1.0, perceptual_weight=0.0)
    assert loss.discriminator is None and loss.perceptual_loss is None
    assert not any(k.startswith("discriminator") for k in loss.state_dict())
    x, y = images(3), images(4)
    total, logs = loss.generator_loss(x, y, torch.tensor([0.4, 0.8]), step=10_000)
    assert total.item() == pytest.approx((x - y).abs().mean().item() + 0.25 * 0.6, rel=1e-6)
    assert logs["g"] == 0.0 and logs["disc_factor"] == 0.0 and logs["codebook"] == pytest.approx(0.6)
    with pytest.raises(RuntimeError, match="gan=False"):
        loss.discriminator_loss(x, y, step=10_000)


# --------------------------------------------------------------------------------------------------------------------
# LPIPS from local files only
# --------------------------------------------------------------------------------------------------------------------


def test_lpips_off_without_files(caplog):
    with caplog.at_level(logging.WARNING, logger="vae_train.vqgan_loss"):
        loss = VQGANLoss(perceptual_weight=1.0, gan=False)
    assert loss.perceptual_loss is None and loss.perceptual_weight == 0.0 and not loss.perceptual_enabled
    assert sum("perceptual term is OFF" in r.getMessage() for r in caplog.records) == 1
    assert not any(k.startswith("perceptual_loss") for k in loss.state_dict())
    assert lpips_available(None, None) is False


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random torchvision VGG16 state dict file and a random (positive) LPIPS lin file, like vgg.pth."""
    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg_path, lin_path = root / "vgg16-random.pth", root / "vgg.pth"
    torch.save(vgg16(weights=None).state_dict(), vgg_path)
    chans = (64, 128, 256, 512, 512)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(chans)}, lin_path)
    return vgg_path, lin_path


def test_lpips_enabled_with_local_files(lpips_files, tmp_path):
    vgg_path, lin_path = lpips_files
    assert lpips_available(vgg_path, lin_path)
    assert not lpips_available(vgg_path, None) and not lpips_available(None, lin_path)
    assert not lpips_available(tmp_path / "missing.pth", lin_path)
    with pytest.raises(ValueError, match="incomplete"):
        LPIPS(vgg_path, None)

    lp = LPIPS(vgg_path, lin_path)
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training and not lp.lin0.training  # dropout never active
    vgg_sd = torch.load(vgg_path, weights_only=True)
    assert torch.equal(lp.net.slice3.get_parameter("14.weight"), vgg_sd["features.14.weight"])
    assert torch.equal(lp.net.slice5.get_parameter("28.bias"), vgg_sd["features.28.bias"])
    assert lp.scaling_layer.shift.flatten().tolist() == pytest.approx([-0.030, -0.088, -0.188])
    assert lp.scaling_layer.scale.flatten().tolist() == pytest.approx([0.458, 0.448, 0.450])

    x, y = images(5), images(6)
    d_same, d_diff = lp(x, x), lp(x, y.requires_grad_())
    assert d_same.shape == (2,) and torch.all(d_same == 0)
    assert torch.all(d_diff > 0)
    d_diff.sum().backward()  # gradients reach the input, not the frozen weights
    assert y.grad is not None and lp.lin0.model[1].weight.grad is None

    # a taming-style state dict with loss.perceptual_loss.* keys, as one file
    taming = {f"loss.perceptual_loss.{k}": v for k, v in lp.state_dict().items()}
    taming["encoder.conv_in.weight"] = torch.zeros(1)
    taming_path = tmp_path / "taming.ckpt"
    torch.save({"state_dict": taming}, taming_path)
    assert lpips_available(taming_path, None)
    lp2 = LPIPS(taming_path)
    assert torch.allclose(lp2(x, y), lp(x, y))

    # the loss uses it: nll = L1 + perceptual_weight * mean(LPIPS)
    loss = VQGANLoss(gan=False, perceptual_weight=0.5, lpips_vgg_path=vgg_path, lpips_lin_path=lin_path)
    assert loss.perceptual_enabled
    _, logs = loss.generator_loss(x, y.detach(), torch.tensor(0.0), step=0)
    assert logs["p"] == pytest.approx(lp(x, y).mean().item(), rel=1e-5)
    assert logs["nll"] == pytest.approx(logs["rec"] + 0.5 * logs["p"], rel=1e-5)
    assert [k for k in loss.state_dict() if k.startswith("perceptual_loss.lin")] == [
        f"perceptual_loss.lin{k}.model.1.weight" for k in range(5)
    ]
    # and load_taming_loss_state fills perceptual_loss from loss.perceptual_loss.*
    changed = {k: v.clone() for k, v in taming.items()}
    changed["loss.perceptual_loss.lin2.model.1.weight"].fill_(0.123)
    loaded = loss.load_taming_loss_state(changed)
    assert "loss.perceptual_loss.lin2.model.1.weight" in loaded and "encoder.conv_in.weight" not in loaded
    assert torch.all(loss.perceptual_loss.lin2.model[1].weight == 0.123)


# --------------------------------------------------------------------------------------------------------------------
# loading taming checkpoints
# --------------------------------------------------------------------------------------------------------------------


def test_load_taming_loss_state_discriminator_strict():
    torch.manual_seed(1)
    source = VQGANLoss(disc_ndf=16, perceptual_weight=0.0)
    ckpt = {f"loss.{k}": v for k, v in source.state_dict().items()}
    ckpt["decoder.conv_out.weight"] = torch.zeros(3)
    ckpt["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)  # LPIPS is off here: skipped
    torch.manual_seed(2)
    target = VQGANLoss(disc_ndf=16, perceptual_weight=0.0)
    assert not torch.equal(target.discriminator.main[0].weight, source.discriminator.main[0].weight)
    loaded = target.load_taming_loss_state({"state_dict": ckpt})
    assert loaded == [f"loss.discriminator.{k}" for k in TAMING_DISC_KEYS]
    for k, v in source.discriminator.state_dict().items():
        assert torch.equal(target.discriminator.state_dict()[k], v)

    with pytest.raises(RuntimeError):  # strict: a missing key is an error, not a silent partial load
        target.load_taming_loss_state({k: v for k, v in ckpt.items() if k != "loss.discriminator.main.9.weight"})
    with pytest.raises(RuntimeError):  # wrong width
        VQGANLoss(disc_ndf=8, perceptual_weight=0.0).load_taming_loss_state(ckpt)
    assert VQGANLoss(gan=False, perceptual_weight=0.0).load_taming_loss_state(ckpt) == []


# --------------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------------


def numpy_ssim(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """Direct SSIM of one [C, H, W] image pair: explicit weighted sums over every fully-inside 11x11 window."""
    c1, c2 = 0.01**2, 0.03**2
    g = np.exp(-((np.arange(win) - win // 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    per_channel = []
    for xc, yc in zip(x, y, strict=True):
        px = np.lib.stride_tricks.sliding_window_view(xc, (win, win))
        py = np.lib.stride_tricks.sliding_window_view(yc, (win, win))
        mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
        vx = (px**2 * w).sum((-1, -2)) - mx**2
        vy = (py**2 * w).sum((-1, -2)) - my**2
        cxy = (px * py * w).sum((-1, -2)) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return float(np.mean(per_channel))


def test_psnr():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.isinf(psnr(x, x)).all()
    out = psnr(x, x + 0.1)
    assert out.shape == (3,) and torch.allclose(out, torch.full((3,), 20.0), atol=1e-4)
    assert psnr(x * 255, (x + 0.1) * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_matches_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=gen)
    y = (x + 0.15 * torch.randn(2, 3, 24, 20, generator=gen)).clamp(0, 1)
    assert torch.all(ssim(x, x) == 1.0)
    got = ssim(x, y)
    assert got.shape == (2,)
    for i in range(2):
        assert got[i].item() == pytest.approx(numpy_ssim(x[i].numpy().astype(np.float64), y[i].numpy()), abs=1e-4)
    assert got.double().sub(ssim(x.double(), y.double())).abs().max() < 1e-5
    scipy_ndimage = pytest.importorskip("scipy.ndimage")  # skimage's method: reflect-filter, then crop 5 pixels
    xs, ys = x[0].double().numpy(), y[0].double().numpy()

    def f(a: np.ndarray) -> np.ndarray:
        return scipy_ndimage.gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")

    maps = []
    for xc, yc in zip(xs, ys, strict=True):
        mx, my = f(xc), f(yc)
        vx, vy, cxy = f(xc * xc) - mx**2, f(yc * yc) - my**2, f(xc * yc) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        maps.append(s[5:-5, 5:-5].mean())
    assert got[0].item() == pytest.approx(float(np.mean(maps)), abs=1e-4)
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_codebook_usage():
    idx = torch.arange(8).repeat(5).view(5, 8)  # uniform over 8 of 16 codes
    usage = codebook_usage(idx, 16)
    assert usage["perplexity"] == pytest.approx(8.0) and usage["used_fraction"] == 0.5 and usage["used"] == 8
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 16)["perplexity"] == pytest.approx(1.0)
    empty = torch.tensor([], dtype=torch.long)
    assert codebook_usage(empty, 16) == {"perplexity": 0.0, "used_fraction": 0.0, "used": 0}
    with pytest.raises(ValueError):
        codebook_usage(torch.tensor([16]), 16)


def test_running_stats_batch_by_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 16, 16, generator=gen) * 0.8
    y = x + 0.1
    stats = RunningStats(num_tokens=16)
    stats.update(x[:2], y[:2], indices=torch.arange(0, 4))
    stats.update(x[2:], x[2:], indices=torch.arange(4, 8))  # identical images: PSNR capped at 100 dB
    stats.add("lpips", torch.tensor([0.1, 0.3]))
    res = stats.result()
    assert res["n_psnr"] == 5 and res["psnr"] == pytest.approx((2 * 20.0 + 3 * 100.0) / 5, abs=1e-3)
    expected_ssim = torch.cat([ssim(x[:2], y[:2]), torch.ones(3)]).mean().item()
    assert res["ssim"] == pytest.approx(expected_ssim, abs=1e-6)
    assert res["perplexity"] == pytest.approx(8.0) and res["used"] == 8 and res["used_fraction"] == 0.5
    assert res["lpips"] == pytest.approx(0.2)
    stats.reset()
    assert stats.result() == {}
    assert torch.allclose(to_unit_range(torch.tensor([-1.0, 0.0, 1.0, 2.0])), torch.tensor([0.0, 0.5, 1.0, 1.0]))
