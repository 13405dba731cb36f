"""``--scorer clip:CKPT``: our CLIP (a run directory, ``ckpt-*.pt`` or ``model.safetensors`` of
``python -m clip_train``)."""

from __future__ import annotations

from zh_t2i_rerank.scorer import EmbeddingScorer, fast_image_tower, need_args

USAGE = "clip:CKPT"
HELP = "our CLIP: a run directory, ckpt-*.pt or model.safetensors of `python -m clip_train`"


def make_scorer(args: list[str], device: str = "auto", batch_size: int = 32,
                trust_checkpoint: bool = False, precision: str = "fp32") -> EmbeddingScorer:
    """``clip:CKPT``: a run directory / ``ckpt-*.pt`` / ``model.safetensors`` of ``python -m clip_train``.

    Our checkpoints always load with ``weights_only=True``; ``trust_checkpoint`` is accepted for the common factory
    signature and not needed."""
    from clip_train.load import load_clip
    from clip_train.model import normalize
    from form_data.datasets import default_transform
    from zh_t2i_base.device import resolve_device

    (path,) = need_args(args, ["CKPT"], "clip")
    dev = resolve_device(device)
    clip = load_clip(path, dev)
    model, tok, length = clip.model, clip.tokenizer, clip.context_length
    model.visual = fast_image_tower(model.visual, clip.image_size, dev)
    return EmbeddingScorer(default_transform(clip.image_size),
                           lambda x: model.encode_image(normalize(model, x)),
                           lambda t: model.encode_text(tok.encode([t], length).to(dev)), dev, batch_size, precision)


