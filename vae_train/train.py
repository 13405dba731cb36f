"""Training the image tokenizers (dVAE, VQGAN) on the shared runtime.

``VAEConfig`` holds the model and data options (seed-compatible names where the seed had them: image_size,
num_tokens, num_layers, emb_dim); ``RuntimeConfig`` holds everything about the run (steps, lr, precision, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from form_data.datasets import collate, default_transform, open_dataset
from train_runtime import RuntimeConfig, Task, Trainer
from train_runtime.config import path_field, to_dict
from vae_train.dvae import DiscreteVAE, DVAEConfig
from vae_train.evaluate import image_batches, reconstruction_metrics
from vae_train.vqgan import VQGAN, VQGANConfig
from vae_train.vqgan_loss import VQGANLoss
from zh_t2i_base.cli import PathArg, UserError
from zh_t2i_base.images import save_image_grid


@dataclass
class VAEConfig:
    model: str = "dvae"  # dvae | vqgan
    # CSV / JSONL / webdataset shards / image folder (form_data formats)
    train_data: str = path_field(PathArg("in", content="images", urls=True))
    val_data: str = path_field(PathArg("in", content="images"))  # held-out split for PSNR/SSIM/codebook usage
    image_size: int = 64
    random_crop: bool = False  # RandomResizedCrop(scale 0.75-1) as the seed's DALLE did; else resize + centre crop
    num_tokens: int = 512  # codebook size
    emb_dim: int = 256  # codebook dim (dVAE) / embed_dim (VQGAN)
    # dVAE
    num_layers: int = 3  # stride-2 downsamples: token grid = image_size / 2**num_layers
    hidden_dim: int = 64
    num_resnet_blocks: int = 1
    temperature: float = 1.0  # Gumbel-softmax start temperature
    temp_min: float = 0.0625
    anneal_rate: float = 1e-3  # temperature = max(temperature * exp(-anneal_rate * step), temp_min)
    straight_through: bool = False
    kl_loss_weight: float = 0.0
    smooth_l1_loss: bool = False
    activation: str = "relu"  # dVAE: relu (DALLE-pytorch) | leaky_relu (robust at high lr with --quantizer vq)
    # VQGAN (taming architecture; the downsampling factor is 2**(len(ch_mult)-1))
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    dropout: float = 0.0
    quantizer: str = ""  # gumbel | vq; empty = the model's own (dVAE: gumbel as DALL-E; VQGAN: vq as taming)
    beta: float = 0.25  # commitment weight (vq)
    # fine-tune: a taming last.ckpt (with --init-yaml) or one of our checkpoints
    init_from: str = path_field(PathArg("in", content="checkpoint"))
    init_yaml: str = path_field(PathArg("in", "file", "yaml"))
    trust_checkpoint: bool = False  # allow pickle when loading --init-from (Lightning files need it)
    gan: bool = False  # patch-GAN hinge loss with adaptive weight
    disc_start: int = 2000
    disc_weight: float = 0.8
    disc_lr_scale: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; on only when both weight files are given
    lpips_vgg: str = path_field(PathArg("in", "file", "checkpoint"))  # local torchvision vgg16 state dict
    lpips_lin: str = path_field(PathArg("in", "file", "checkpoint"))  # local LPIPS vgg.pth (lin layers)
    eval_images: int = 512  # val images used for PSNR/SSIM/usage


def build_model(vc: VAEConfig) -> DiscreteVAE | VQGAN:
    for name in ("num_tokens", "emb_dim", "hidden_dim", "ch", "z_channels", "image_size"):
        if getattr(vc, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(vc, name)}")
    try:
        return _build_model(vc)
    except ValueError as e:  # the model configs validate themselves; for a CLI user that is a bad flag
        raise UserError(f"bad model options: {e}") from None


def _build_model(vc: VAEConfig) -> DiscreteVAE | VQGAN:
    if vc.model == "dvae":
        if vc.image_size % (2 ** vc.num_layers):
            raise UserError(f"--image-size {vc.image_size} is not divisible by 2**num_layers = {2 ** vc.num_layers}")
        return DiscreteVAE(DVAEConfig(image_size=vc.image_size, num_tokens=vc.num_tokens, codebook_dim=vc.emb_dim,
                                      num_layers=vc.num_layers, num_resnet_blocks=vc.num_resnet_blocks,
                                      hidden_dim=vc.hidden_dim, temperature=vc.temperature,
                                      straight_through=vc.straight_through, kl_div_loss_weight=vc.kl_loss_weight,
                                      smooth_l1_loss=vc.smooth_l1_loss, quantizer=vc.quantizer or "gumbel",
                                      beta=vc.beta, activation=vc.activation))
    if vc.model == "vqgan":
        if vc.init_from:
            from vae_train.load import load_image_tokenizer

            model = load_image_tokenizer(vc.init_from, yaml_path=vc.init_yaml or None,
                                         trust_checkpoint=vc.trust_checkpoint)
            if not isinstance(model, VQGAN):
                raise UserError(f"--init-from {vc.init_from} is not a VQGAN checkpoint")
            return model
        factor = 2 ** (len(vc.ch_mult) - 1)
        if vc.image_size % factor:
            raise UserError(f"--image-size {vc.image_size} is not divisible by the downsampling factor {factor}")
        return VQGAN(VQGANConfig(embed_dim=vc.emb_dim, n_embed=vc.num_tokens, z_channels=vc.z_channels,
                                 resolution=vc.image_size, ch=vc.ch, ch_mult=tuple(vc.ch_mult),
                                 num_res_blocks=vc.num_res_blocks, attn_resolutions=tuple(vc.attn_resolutions),
                                 dropout=vc.dropout, quantizer=vc.quantizer or "vq", beta=vc.beta))
    raise UserError(f"--model must be dvae or vqgan, got {vc.model!r}")


class VAETask(Task):
    def __init__(self, vc: VAEConfig, model: DiscreteVAE | VQGAN, val_set=None):
        self.vc, self.model, self.val_set = vc, model, val_set
        self.kind = vc.model
        if self.kind == "vqgan":
            self.loss = VQGANLoss(disc_start=vc.disc_start, disc_weight=vc.disc_weight, gan=vc.gan,
                                  perceptual_weight=vc.perceptual_weight, lpips_vgg_path=vc.lpips_vgg or None,
                                  lpips_lin_path=vc.lpips_lin or None)
            if vc.init_from and not vc.init_from.endswith((".pt", ".safetensors")):
                from vae_train.convert import taming_loss_state

                state = taming_loss_state(vc.init_from, trust_checkpoint=vc.trust_checkpoint)
                if state:
                    self.loss.load_taming_loss_state(state)
        self._fixed: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"model": self.model}
        if self.kind == "vqgan" and self.vc.gan:
            mods["disc"] = self.loss.discriminator
        return mods

    def lr_scale(self, name: str) -> float:
        return self.vc.disc_lr_scale if name == "disc" else 1.0

    def temperature(self, step: int) -> float:
        return max(self.vc.temperature * math.exp(-self.vc.anneal_rate * step), self.vc.temp_min)

    def training_step(self, batch, step):
        images = batch["image"]
        if self.kind == "dvae":
            temp = self.temperature(step)
            loss, logs, _ = self.ddp["model"](images, temp)
            extra = {k: float(v) for k, v in logs.items()}
            if self.model.cfg.quantizer == "gumbel":
                extra["temperature"] = temp
            return {"model": loss}, extra
        if self.loss.perceptual_loss is not None:
            self.loss.perceptual_loss.to(images.device)
        recon, inputs, codebook_loss, _ = self.ddp["model"](images)
        g_loss, g_logs = self.loss.generator_loss(inputs, recon, codebook_loss, step, self.model.last_layer())
        losses = {"model": g_loss}
        logs = {f"g/{k}": v for k, v in g_logs.items()}
        if self.vc.gan:
            d_loss, d_logs = self.loss.discriminator_loss(inputs, recon.detach(), step)
            losses["disc"] = d_loss
            logs.update({f"d/{k}": v for k, v in d_logs.items()})
        return losses, logs

    # -- evaluation and grids ------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        return reconstruction_metrics(self.model, image_batches(self.val_set, self.vc.eval_images, self.env.device))[0]

    def sample(self, step: int, run_dir: Path) -> None:
        if self._fixed is None:
            if self.val_set is None:
                return
            self._fixed = next(image_batches(self.val_set, 16, self.env.device, 16), None)  # None: 16 broken rows
            if self._fixed is None:
                return
        recon = self.model.decode(self.model.encode(self._fixed))
        save_image_grid(torch.cat([self._fixed, recon]), run_dir / f"recon_{step:08d}.png", nrow=len(self._fixed))
        save_image_grid(torch.cat([self._fixed, recon]), run_dir / "recon_latest.png", nrow=len(self._fixed))

    def meta(self) -> dict:
        return {"kind": self.kind, "config": self.model.cfg.to_dict(), "image_size": self.vc.image_size}


def train(vc: VAEConfig, rc: RuntimeConfig) -> dict:
    """Build data, model and task from the configs and run the shared trainer."""
    if not vc.train_data:
        raise UserError("--train-data is required (a CSV/JSONL/webdataset/image folder from form_data)")
    train_set = open_dataset(vc.train_data, transform=default_transform(vc.image_size, random_crop=vc.random_crop),
                             image_size=vc.image_size)
    val_set = (open_dataset(vc.val_data, transform=default_transform(vc.image_size), image_size=vc.image_size)
               if vc.val_data else None)
    torch.manual_seed(rc.seed)
    model = build_model(vc)
    if vc.model == "vqgan" and vc.gan and rc.grad_accum > 1:
        raise UserError("--gan with --grad-accum > 1 is not supported (the discriminator steps every batch)")
    task = VAETask(vc, model, val_set)
    config = {"runtime": to_dict(rc), "vae": to_dict(vc)}
    return Trainer(rc, task, train_set, collate_fn=collate, config=config).fit()
