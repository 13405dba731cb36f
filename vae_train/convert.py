"""Read foreign image-tokenizer checkpoints: taming-transformers VQGAN (``last.ckpt`` + ``model.yaml``).

The public taming releases are a PyTorch-Lightning checkpoint whose ``state_dict`` holds the model (``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.*``) and its training loss (``loss.*``: LPIPS and
the PatchGAN discriminator), plus a YAML file::

    model:
      target: taming.models.vqgan.VQModel        # or taming.models.vqgan.GumbelVQ
      params: {embed_dim: 256, n_embed: 1024, ddconfig: {...}, lossconfig: {...}}

Every problem with the user's files raises :class:`zh_t2i_base.cli.UserError` with a one-line message.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import yaml
from torch import Tensor

from vae_train.vqgan import VQGAN, VQGANConfig
from zh_t2i_base.cli import UserError

TARGETS = {
    "taming.models.vqgan.VQModel": "vq",
    "taming.models.vqgan.GumbelVQ": "gumbel",
}
DDCONFIG_KEYS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                 "attn_resolutions", "dropout", "resamp_with_conv")
REQUIRED_DDCONFIG = ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")
LOSS_PREFIX = "loss."
MAX_LISTED = 8


def vqgan_config_from_dict(model_cfg: dict, source: str = "config") -> VQGANConfig:
    """Build a :class:`VQGANConfig` from a taming config mapping (the whole YAML, or its ``model`` entry)."""
    if not isinstance(model_cfg, dict):
        raise UserError(f"{source}: expected a mapping with model.target and model.params")
    model_cfg = model_cfg.get("model", model_cfg)
    if not isinstance(model_cfg, dict) or "params" not in model_cfg:
        raise UserError(f"{source}: no model.params (is this a taming model.yaml?)")
    target = model_cfg.get("target", "taming.models.vqgan.VQModel")
    if target not in TARGETS:
        raise UserError(f"{source}: model.target {target!r} is not supported (expected one of {', '.join(TARGETS)})")
    params = model_cfg["params"]
    dd = params.get("ddconfig") if isinstance(params, dict) else None
    if not isinstance(dd, dict):
        raise UserError(f"{source}: model.params.ddconfig is missing")
    missing = [k for k in ("embed_dim", "n_embed") if k not in params] + [k for k in REQUIRED_DDCONFIG if k not in dd]
    if missing:
        raise UserError(f"{source}: missing model parameters: {', '.join(missing)}")
    if params.get("remap") is not None:
        raise UserError(f"{source}: codebook remapping (model.params.remap) is not supported")
    fields = {k: dd[k] for k in DDCONFIG_KEYS if k in dd}
    quantizer = TARGETS[target]
    if quantizer == "gumbel":
        fields["kl_weight"] = params.get("kl_weight", 1e-8)
    try:
        return VQGANConfig(embed_dim=int(params["embed_dim"]), n_embed=int(params["n_embed"]), quantizer=quantizer,
                           **fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: bad model parameters: {e}") from None


def vqgan_config_from_yaml(path: str | Path) -> VQGANConfig:
    """Read a taming ``model.yaml`` (``model.target`` + ``model.params``; ``lossconfig`` is ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read VQGAN config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return vqgan_config_from_dict(data, source=str(path))


def find_taming_yaml(ckpt_path: Path) -> Path | None:
    """Where taming puts the config next to a checkpoint: ``model.yaml`` beside it, ``../configs/model.yaml``,
    ``<name>.yaml``/``.yml``, or the single ``../configs/*-project.yaml`` a taming training run writes."""
    candidates = [ckpt_path.parent / "model.yaml", ckpt_path.parent.parent / "configs" / "model.yaml",
                  ckpt_path.with_suffix(".yaml"), ckpt_path.with_suffix(".yml")]
    for c in candidates:
        if c.is_file():
            return c
    projects = sorted((ckpt_path.parent.parent / "configs").glob("*-project.yaml"))
    return projects[0] if len(projects) == 1 else None


def _torch_load(path: Path, map_location, trust_checkpoint: bool):
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        if needs and not trust_checkpoint:
            raise UserError(f"{path} holds pickled Python objects ({needs.group(1)}), which a safe load refuses; "
                            "pass trust_checkpoint=True (only for files from a source you trust)") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None


def _read_state_dict(path: Path, map_location, trust_checkpoint: bool) -> dict[str, Tensor]:
    obj = _torch_load(path, map_location, trust_checkpoint)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a Lightning checkpoint with a 'state_dict' or a bare state dict")
    return state


def taming_loss_state(ckpt_path: str | Path, map_location="cpu", *,
                      trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The ``loss.*`` entries of a taming checkpoint (keys keep the ``loss.`` prefix; empty if it has none)."""
    state = _read_state_dict(Path(ckpt_path), map_location, trust_checkpoint)
    return {k: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")


def load_vqgan_state(model: VQGAN, state_dict: dict, source: str = "checkpoint") -> dict[str, Tensor]:
    """Load a taming ``state_dict`` into ``model`` strictly (every model key, nothing else besides ``loss.*``).

    Returns the ``loss.*`` entries as they are (LPIPS + discriminator weights, for fine-tuning).
    """
    loss_state = {k: v for k, v in state_dict.items() if k.startswith(LOSS_PREFIX)}
    own = {k: v for k, v in state_dict.items() if not k.startswith(LOSS_PREFIX)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in own]
    unexpected = [k for k in own if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if not problems:
        wrong = [f"{k} {tuple(own[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if not isinstance(own[k], Tensor) or own[k].shape != v.shape]
        if wrong:
            problems.append(f"shape mismatch (checkpoint vs config): {_listed(wrong)}")
    if problems:
        raise UserError(f"{source} does not match the VQGAN config: {'; '.join(problems)}")
    model.load_state_dict(own, strict=True)
    return loss_state


def load_vqgan_with_loss_state(ckpt_path: str | Path, yaml_path: str | Path | None = None, map_location="cpu", *,
                               config: VQGANConfig | None = None,
                               trust_checkpoint: bool = False) -> tuple[VQGAN, dict[str, Tensor]]:
    """Like :func:`load_vqgan`, also returning the checkpoint's ``loss.*`` tensors (keys keep the ``loss.`` prefix)."""
    ckpt_path = Path(ckpt_path)
    if config is None:
        if yaml_path is None:
            yaml_path = find_taming_yaml(ckpt_path)
            if yaml_path is None:
                raise UserError(f"no model.yaml found next to {ckpt_path}; pass the taming config path")
        config = vqgan_config_from_yaml(yaml_path)
    state = _read_state_dict(ckpt_path, map_location, trust_checkpoint)
    model = VQGAN(config)
    loss_state = load_vqgan_state(model, state, source=str(ckpt_path))
    return model.eval(), loss_state


def load_vqgan(ckpt_path: str | Path, yaml_path: str | Path | None = None, map_location="cpu", *,
               config: VQGANConfig | None = None, trust_checkpoint: bool = False) -> VQGAN:
    """Load a taming-transformers VQGAN (VQModel or GumbelVQ) as a :class:`VQGAN` in eval mode.

    ``ckpt_path``: a Lightning checkpoint holding ``state_dict`` (or a bare state dict). ``yaml_path``: its taming
    config (found next to the checkpoint when omitted); or pass ``config`` directly. Keys must match exactly apart
    from ``loss.*``, which is dropped (see :func:`load_vqgan_with_loss_state`). The file is read with
    ``weights_only=True``; a checkpoint that holds pickled objects needs ``trust_checkpoint=True``.
    """
    model, _ = load_vqgan_with_loss_state(ckpt_path, yaml_path, map_location, config=config,
                                          trust_checkpoint=trust_checkpoint)
    return model
