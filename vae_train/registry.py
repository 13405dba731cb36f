"""THE list of image-tokenizer kinds. A checkpoint's ``meta["kind"]`` names its entry here; the class rebuilds the
model with ``from_checkpoint(meta, state_dict)`` and implements :class:`vae_train.protocol.ImageTokenizer`.

A new tokenizer is one model file in ``vae_train/`` and one line in :data:`TOKENIZERS`; its training may live in a
package of its own (as Styled-VQ's does in ``styled_vq/``)."""

from __future__ import annotations

from vae_train.dvae import DiscreteVAE
from vae_train.styled import StyledVQ
from vae_train.vqgan import VQGAN

TOKENIZERS: dict[str, type] = {
    "dvae": DiscreteVAE,
    "vqgan": VQGAN,
    "styled_vq": StyledVQ,
}
