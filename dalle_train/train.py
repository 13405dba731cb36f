"""Training the DALLE transformer on the shared runtime.

Data: a token file from ``python -m vae_train tokenize`` (the default: no image-tokenizer forward per step), or an
image split (CSV / JSONL / folder) encoded on the fly by ``--image-tokenizer``. Captions are tokenized with the
toolkit's Chinese tokenizer to ``text_seq_len``.

Every checkpoint is self-describing (``meta``): the model config, the text vocabulary itself, a reference to the
image tokenizer (path, yaml, kind, sizes) and the generator (``model_kind``: ``"dalle"``, autoregressive, or
``"masked"``, MaskGIT-style; ``--kind``), so ``dalle_gen.py`` needs only the checkpoint path.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dalle_train.masked import MaskedDALLE
from dalle_train.masked_sample import DEFAULT_STEPS, sample_tokens_masked
from dalle_train.model import DALLE, DALLEConfig
from dalle_train.sample import sample_tokens
from form_data.datasets import collate, default_transform, is_shard_url, open_dataset
from form_data.tokenizer import ChineseTokenizer, load_tokenizer, vocab_digest
from train_runtime import RuntimeConfig, Task, Trainer
from train_runtime.config import path_field, to_dict
from zh_t2i_base.cli import PathArg, UserError, user_errors
from zh_t2i_base.images import save_image_grid

KINDS = {"dalle": DALLE, "masked": MaskedDALLE}


@dataclass
class DALLETrainConfig:
    kind: str = "dalle"  # dalle (autoregressive) | masked (MaskGIT-style, bidirectional; loss_img_weight unused)
    # token file (.pt) from `vae_train tokenize`, or an image split encoded on the fly
    train_data: str = path_field(PathArg("in", content="tokens", urls=True))  # or images (shards too)
    val_data: str = path_field(PathArg("in", content="tokens"))  # same kind as train_data: validation loss
    # default: the one the token file was made with; required for image splits
    image_tokenizer: str = path_field(PathArg("in", content="checkpoint"))
    image_tokenizer_yaml: str = path_field(PathArg("in", "file", "yaml"))  # taming model.yaml (with a taming .ckpt)
    # text vocab (vocab.txt / dir / tokenizer.json); default: cn_clip's, else error
    vocab: str = path_field(PathArg("in", content="text"))
    text_seq_len: int = 32
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    loss_img_weight: float = 7.0
    null_cond_prob: float = 0.0  # fraction of captions blanked during training (needed for --cond-scale != 1)
    tie_embeddings: bool = False
    eval_samples: int = 1024  # val samples for the validation loss
    sample_prompts: str = ""  # "|"-separated prompts for the periodic grids; default: 4 captions of the data
    sample_images: int = 8  # images per prompt in the grids
    sample_cond_scale: float = 1.0
    sample_top_k: int = 0  # 0 = filter_thres 0.9 of the image vocabulary
    sample_steps: int = DEFAULT_STEPS  # --kind masked: decoding steps of the grids


def text_tokenizer_meta(tok: ChineseTokenizer) -> dict:
    tokens = tok.vocab_tokens()
    return {"source": tok.source, "vocab_size": tok.vocab_size, "sha1": vocab_digest(tokens), "vocab": tokens}


def encode_captions(tok: ChineseTokenizer, captions: list[str], length: int, what: str) -> torch.Tensor:
    """Captions -> [N, length] ids; warns once with the number of captions cut to ``length`` tokens."""
    ids, cut = tok.encode(captions, length, return_truncated=True)
    if int(cut.sum()):
        warnings.warn(f"{what}: {int(cut.sum())} of {len(captions)} captions are longer than {length} tokens and were "
                      f"truncated", stacklevel=2)
    return ids


class TokenDataset(Dataset):
    """A token file: (caption ids, image token ids) pairs, everything in memory."""

    def __init__(self, path: str | os.PathLike, tok: ChineseTokenizer, text_seq_len: int):
        from zh_t2i_base.checkpoint import load

        data = load(path)
        if not {"tokens", "captions", "tokenizer"} <= set(data):
            raise UserError(f"{path}: not a token file of `python -m vae_train tokenize` (tokens/captions/tokenizer)")
        self.path = Path(path)
        self.tokenizer_info: dict = data["tokenizer"]
        self.image_tokens = data["tokens"].long()
        self.captions: list[str] = list(data["captions"])
        self.text = encode_captions(tok, self.captions, text_seq_len, str(path))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.text[i], "image_tokens": self.image_tokens[i], "index": i}


def is_token_file(path: str) -> bool:
    return str(path).endswith(".pt")


class DALLETask(Task):
    def __init__(self, dc: DALLETrainConfig, model: DALLE | MaskedDALLE, tok: ChineseTokenizer, image_tok_ref: dict,
                 image_tokenizer: nn.Module | None, val_set: TokenDataset | None, prompts: list[str]):
        self.dc, self.model, self.tok = dc, model, tok
        self.image_tok_ref = image_tok_ref
        self.image_tokenizer = image_tokenizer  # frozen; needed on the fly and for sample grids
        self.val_set, self.prompts = val_set, prompts

    def modules(self) -> dict[str, nn.Module]:
        return {"dalle": self.model}

    def _image_tokenizer(self) -> nn.Module:
        if self.image_tokenizer is None:
            from vae_train.load import load_image_tokenizer

            self.image_tokenizer = load_image_tokenizer(self.image_tok_ref["path"],
                                                        self.image_tok_ref.get("yaml") or None)
        return self.image_tokenizer.to(self.env.device).eval()

    def training_step(self, batch, step):
        if "image_tokens" in batch:
            text, image = batch["text"], batch["image_tokens"]
        else:  # an image split: encode with the frozen tokenizer (no gradients, eval semantics)
            text = encode_captions(self.tok, list(batch["caption"]), self.dc.text_seq_len, "batch").to(self.env.device)
            with user_errors(ValueError):  # e.g. a Styled-VQ without its codebook yet
                image = self._image_tokenizer().encode(batch["image"]).long()
        loss, logs = self.ddp["dalle"](text, image, self.dc.null_cond_prob)
        return {"dalle": loss}, logs

    def evaluate(self, step: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        n = min(len(self.val_set), self.dc.eval_samples)
        masked = isinstance(self.model, MaskedDALLE)
        gen = torch.Generator().manual_seed(0)  # masked: the same masks at every evaluation
        text_sum = img_sum = 0.0
        for lo in range(0, n, 64):
            idx = slice(lo, min(n, lo + 64))
            text = self.val_set.text[idx].to(self.env.device)
            image = self.val_set.image_tokens[idx].to(self.env.device)
            _, logs = self.model(text, image, generator=gen) if masked else self.model(text, image)
            text_sum += logs.get("loss_text", 0.0) * text.shape[0]
            img_sum += logs["loss_img"] * text.shape[0]
        if masked:  # CE on the masked positions of a cosine-schedule mask (no text loss: text is only read)
            return {"loss_img": img_sum / n}
        return {"loss_text": text_sum / n, "loss_img": img_sum / n}

    def sample(self, step: int, run_dir: Path) -> None:
        if not self.prompts or self.dc.sample_images < 1:
            return
        decoder = self._image_tokenizer()
        k = self.dc.sample_images
        grids = []
        for p, prompt in enumerate(self.prompts):
            text = self.tok.encode(prompt, self.dc.text_seq_len)
            masked = {"steps": self.dc.sample_steps} if isinstance(self.model, MaskedDALLE) else {}
            sampler = sample_tokens_masked if masked else sample_tokens
            ids = sampler(self.model, text, [p * 1000 + i for i in range(k)], batch_size=k,
                          top_k=self.dc.sample_top_k or None, filter_thres=None if self.dc.sample_top_k else 0.9,
                          cond_scale=self.dc.sample_cond_scale, **masked)
            grids.append(decoder.decode(ids.to(self.env.device)).cpu())
        images = torch.cat(grids)
        save_image_grid(images, run_dir / f"samples_{step:08d}.png", nrow=k)
        save_image_grid(images, run_dir / "samples_latest.png", nrow=k)

    def meta(self) -> dict:
        return {"kind": "dalle", "model_kind": self.dc.kind, "config": self.model.cfg.to_dict(),
                "text_tokenizer": text_tokenizer_meta(self.tok),
                "image_tokenizer": self.image_tok_ref, "sample_prompts": self.prompts}


def _tokenizer_ref(path: str, yaml: str, model) -> dict:
    return {"path": str(Path(path).resolve()), "yaml": str(Path(yaml).resolve()) if yaml else "",
            "kind": type(model).__name__, "num_tokens": int(model.num_tokens), "seq_len": int(model.seq_len),
            "fmap_size": int(getattr(model, "fmap_size", 0) or 0), "image_size": int(model.image_size)}


def build(dc: DALLETrainConfig) -> tuple[Dataset, DALLETask, object]:
    """Data set, task and collate function from the options (validates everything before training starts)."""
    if not dc.train_data:
        raise UserError("--train-data is required: a token file from `python -m vae_train tokenize`, or an image split "
                        "with --image-tokenizer")
    if not is_shard_url(dc.train_data) and not Path(dc.train_data).exists():
        raise UserError(f"--train-data not found: {dc.train_data}")
    if not 0.0 <= dc.null_cond_prob < 1.0:
        raise UserError(f"--null-cond-prob must be in [0, 1), got {dc.null_cond_prob}")
    if dc.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {dc.kind!r}")
    if dc.sample_steps < 1:
        raise UserError(f"--sample-steps must be >= 1, got {dc.sample_steps}")
    tok = load_tokenizer(dc.vocab or None)
    image_tokenizer = None
    if is_token_file(dc.train_data):
        train_set = TokenDataset(dc.train_data, tok, dc.text_seq_len)
        info = train_set.tokenizer_info
        if dc.image_tokenizer:
            from vae_train.load import load_image_tokenizer

            image_tokenizer = load_image_tokenizer(dc.image_tokenizer, dc.image_tokenizer_yaml or None)
            ref = _tokenizer_ref(dc.image_tokenizer, dc.image_tokenizer_yaml, image_tokenizer)
            for key in ("num_tokens", "seq_len"):
                if ref[key] != info[key]:
                    raise UserError(f"--image-tokenizer has {key} {ref[key]} but {dc.train_data} was tokenized with "
                                    f"{key} {info[key]}")
        else:
            ref = {k: info.get(k, "") for k in ("path", "yaml", "kind", "num_tokens", "seq_len", "fmap_size",
                                                "image_size")}
        collate_fn = None
    else:
        if not dc.image_tokenizer:
            raise UserError("--train-data is an image split: give --image-tokenizer to encode it on the fly (or "
                            "pre-tokenize it with `python -m vae_train tokenize`)")
        from vae_train.load import load_image_tokenizer

        image_tokenizer = load_image_tokenizer(dc.image_tokenizer, dc.image_tokenizer_yaml or None)
        ref = _tokenizer_ref(dc.image_tokenizer, dc.image_tokenizer_yaml, image_tokenizer)
        train_set = open_dataset(dc.train_data, transform=default_transform(ref["image_size"]),
                                 image_size=ref["image_size"])
        collate_fn = collate
    val_set = None
    if dc.val_data:
        if not is_token_file(dc.val_data):
            raise UserError("--val-data must be a token file (.pt) from `python -m vae_train tokenize`")
        val_set = TokenDataset(dc.val_data, tok, dc.text_seq_len)
        if val_set.image_tokens.shape[1] != ref["seq_len"]:
            raise UserError(f"--val-data has {val_set.image_tokens.shape[1]} image tokens per image, the training "
                            f"data {ref['seq_len']}")
    try:
        cfg = DALLEConfig(num_text_tokens=tok.vocab_size, text_seq_len=dc.text_seq_len,
                          num_image_tokens=int(ref["num_tokens"]), image_seq_len=int(ref["seq_len"]),
                          image_fmap_size=int(ref["fmap_size"] or 0), dim=dc.dim, depth=dc.depth, heads=dc.heads,
                          dim_head=dc.dim_head, ff_mult=dc.ff_mult, dropout=dc.dropout, attn_dropout=dc.attn_dropout,
                          loss_img_weight=dc.loss_img_weight, tie_embeddings=dc.tie_embeddings,
                          text_pad_id=tok.pad_id)
    except ValueError as e:
        raise UserError(f"bad model options: {e}") from None
    if dc.sample_prompts:
        prompts = [p.strip() for p in dc.sample_prompts.split("|") if p.strip()]
    else:
        captions = train_set.captions if isinstance(train_set, TokenDataset) else []
        prompts = list(dict.fromkeys(captions))[:4]
    model = KINDS[dc.kind](cfg)
    task = DALLETask(dc, model, tok, ref, image_tokenizer, val_set, prompts)
    return train_set, task, collate_fn


def train(dc: DALLETrainConfig, rc: RuntimeConfig) -> dict:
    torch.manual_seed(rc.seed)
    train_set, task, collate_fn = build(dc)
    config = {"runtime": to_dict(rc), "dalle": to_dict(dc)}
    return Trainer(rc, task, train_set, collate_fn=collate_fn, config=config).fit()
