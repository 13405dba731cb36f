"""Image tokenizers for the DALLE stage: DALLE-pytorch's dVAE and a taming-transformers-compatible VQGAN.

Both implement :class:`ImageTokenizer` (``encode`` [0, 1] images -> token ids, ``decode`` ids -> [0, 1] images).
``load_vqgan`` reads the public taming checkpoints (``last.ckpt`` + ``model.yaml``); ``load_image_tokenizer`` loads
any tokenizer checkpoint of the toolkit without the caller knowing its kind.
"""

from vae_train.convert import load_vqgan, load_vqgan_with_loss_state, taming_loss_state, vqgan_config_from_yaml
from vae_train.load import load_image_tokenizer
from vae_train.model import (
    VQGAN,
    DiscreteVAE,
    DVAEConfig,
    ImageTokenizer,
    VQGANConfig,
    VQGANOutput,
)

__all__ = [
    "VQGAN",
    "DVAEConfig",
    "DiscreteVAE",
    "ImageTokenizer",
    "VQGANConfig",
    "VQGANOutput",
    "load_image_tokenizer",
    "load_vqgan",
    "load_vqgan_with_loss_state",
    "taming_loss_state",
    "vqgan_config_from_yaml",
]
