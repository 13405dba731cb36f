"""Chinese CLIP training on the shared runtime: open_clip models, open_clip's ``ClipLoss``, our data and tokenizer.

``ClipConfig`` holds the model and data options (the seed's open_clip flag names where it had them: --train-data,
--val-data, --csv-img-key, --csv-caption-key, --csv-separator, --model, --epochs, --save-frequency); ``RuntimeConfig``
holds the run (steps, lr, precision, ...). Besides the runtime's files, a run directory gets ``vocab.txt`` and
``open_clip_config.json``, so ``open_clip.create_model_and_transforms("local-dir:RUN")`` loads the finished model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from torch import nn
from torch.utils.data import Dataset

from clip_train.eval import evaluate, open_pairs, read_labels, synthetic_attributes
from clip_train.load import check_tokenizer
from clip_train.model import build_config, create, image_size_of, normalize, open_clip_name
from form_data.datasets import collate
from form_data.tokenizer import ChineseTokenizer, load_tokenizer
from train_runtime import RuntimeConfig, Task, Trainer
from train_runtime.config import path_field, to_dict
from zh_t2i_base.cli import PathArg, UserError, user_errors
from zh_t2i_base.fileio import ensure_writable_dir, write_json

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature to <= 100 after every step


@dataclass
class ClipConfig:
    model: str = "zh-tiny"  # zh-tiny | RN50 | ViT-B-32 | ViT-B-16 | another open_clip config name
    # a LOCAL Hugging Face BERT/RoBERTa directory; empty = open_clip's text transformer
    text_model: str = ""
    # vocab.txt / tokenizer.json / dir; empty = the text model's dir, else cn_clip's vocab
    vocab: str = path_field(PathArg("in", content="text"))
    context_length: int = 0  # tokens per caption incl. [CLS]/[SEP]; 0 = the model's (zh-tiny 32, others 52)
    image_size: int = 0  # 0 = the model config's
    # CSV (open_clip layout) / JSONL / image folder from form_data
    train_data: str = path_field(PathArg("in", content="images", urls=True))
    # evaluated every --eval-every steps (or --val-frequency epochs) and at the end
    val_data: str = path_field(PathArg("in", content="images"))
    # the synthetic set's attributes.jsonl: adds attribute-level recall
    val_attributes: str = path_field(PathArg("in", "file", "jsonl"))
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"  # a tab by default, as open_clip; `\t` and `tab` also mean a tab
    random_crop: bool = False  # RandomResizedCrop(scale 0.75-1) on training images; else resize + centre crop
    cache_images: bool = False  # keep decoded training images in memory (small sets, with --workers 0)
    epochs: int = 0  # > 0: train this many epochs (sets --max-steps)
    save_frequency: int = 0  # > 0: epochs between checkpoints (sets --save-every)
    val_frequency: int = 0  # > 0: epochs between evaluations (sets --eval-every)
    local_loss: bool = False  # ClipLoss: local image x global text logits only (memory O(n) under DDP)
    gather_with_grad: bool = False  # ClipLoss: all-gather features with gradients
    grad_checkpointing: bool = False
    val_batch_size: int = 256
    # file of Chinese labels, one a line: zero-shot top-1 on --val-data at every eval
    zeroshot_labels: str = path_field(PathArg("in", "file", "text"))
    zeroshot_template: str = "{}"  # prompt for each label, e.g. 一张{}的图片


def tokenizer_for(cc: ClipConfig) -> ChineseTokenizer:
    if cc.text_model:
        p = Path(cc.text_model).expanduser()
        if not p.is_dir():
            raise UserError(f"--text-model {cc.text_model}: not a local directory (models are never downloaded; "
                            f"point it at a Hugging Face model saved on disk)")
        if not (p / "config.json").is_file():
            raise UserError(f"--text-model {p}: no config.json in that directory")
    return load_tokenizer(cc.vocab or cc.text_model or None)


def open_split(cc: ClipConfig, path: str, image_size: int, random_crop: bool = False,
               flag: str = "--train-data") -> Dataset:
    ds = open_pairs(path, image_size, cc.csv_img_key, cc.csv_caption_key, cc.csv_separator, random_crop)
    check_captions(ds, flag, path)
    return ds


def check_captions(ds: Dataset, flag: str, path: str, probe: int = 256) -> None:
    """A CLIP learns from image-caption pairs: a split whose first ``probe`` rows have no caption (an image folder
    without ``<stem>.txt`` files, an empty caption column) is refused before anything is built or written."""
    caption = getattr(ds, "caption", None)
    if caption is None:  # a stream (webdataset shards): refused elsewhere for training
        return
    n = min(probe, len(ds))
    if n and not any(caption(i).strip() for i in range(n)):
        where = ("a <stem>.txt caption file beside each image" if Path(path).is_dir() else
                 "captions (for a CSV: in the column --csv-caption-key names)")
        raise UserError(f"{flag} {path}: none of its first {n} images has a caption, and a CLIP learns from "
                        f"image-caption pairs; give it {where}, or use a listing with captions from "
                        f"`python -m form_data export`")


class InMemory(Dataset):
    """A dataset whose items are kept after first use (images as uint8, 3*H*W bytes each): from the second epoch on
    no image is decoded again. Only with ``--workers 0``: worker processes would each fill a copy and lose it."""

    def __init__(self, base: Dataset):
        self.base = base
        self.cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.cache.get(i)
        if item is not None:
            return {**item, "image": item["image"].float() / 255}  # bit-identical to ToTensor's uint8 / 255
        sample = self.base[i]
        # broken files passed over are reported once, on the first read
        self.cache[i] = {**sample, "image": (sample["image"] * 255).round().to(torch.uint8), "skipped": 0}
        return sample


class ClipTask(Task):
    def __init__(self, cc: ClipConfig, model: nn.Module, tokenizer: ChineseTokenizer, context_length: int,
                 meta: dict, val_set=None, labels: list[str] | None = None):
        self.cc, self.model, self.tokenizer, self.context_length = cc, model, tokenizer, context_length
        self._meta, self.val_set, self.labels = meta, val_set, labels or []
        self.loss: ClipLoss | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def training_step(self, batch, step):
        if self.loss is None:  # env (rank, world size) is known from the first step on
            self.loss = ClipLoss(local_loss=self.cc.local_loss, gather_with_grad=self.cc.gather_with_grad,
                                 cache_labels=True, rank=self.env.rank, world_size=self.env.world_size)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        images = normalize(self.model, batch["image"])
        text = self.tokenizer.encode(batch["caption"], self.context_length).to(images.device)
        image_features, text_features, logit_scale = self.ddp["model"](images, text)[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        return {"model": loss}, {"logit_scale": float(logit_scale.detach())}

    def evaluate(self, step: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        return evaluate(self.model, self.tokenizer, self.context_length, self.val_set, self.env.device,
                        batch_size=self.cc.val_batch_size, attributes_file=self.cc.val_attributes,
                        labels=self.labels, template=self.cc.zeroshot_template)

    def meta(self) -> dict:
        return self._meta

    def prepare_run_dir(self, run_dir: Path) -> None:
        write_open_clip_files(run_dir, self.model, self.tokenizer, self._meta)


def steps_per_epoch(n_samples: int, rc: RuntimeConfig, world_size: int) -> int:
    """Optimizer steps in one epoch, as the runtime counts them (full batches per rank, whole accumulation groups)."""
    return (math.ceil(n_samples / world_size) // rc.batch_size) // rc.grad_accum


def epoch_schedule(cc: ClipConfig, rc: RuntimeConfig, n_samples: int, world_size: int) -> RuntimeConfig:
    """Turn --epochs / --save-frequency / --val-frequency into the runtime's step counts."""
    for name in ("epochs", "save_frequency", "val_frequency"):
        if getattr(cc, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cc, name)}")
    if not (cc.epochs or cc.save_frequency or cc.val_frequency):
        return rc
    per_epoch = steps_per_epoch(n_samples, rc, world_size)
    if per_epoch < 1:
        raise UserError(f"{n_samples} training samples make no full optimizer step per epoch at --batch-size "
                        f"{rc.batch_size} x --grad-accum {rc.grad_accum} on {world_size} process(es)")
    changes = {}
    if cc.epochs:
        changes["max_steps"] = cc.epochs * per_epoch
    if cc.save_frequency:
        changes["save_every"] = cc.save_frequency * per_epoch
    if cc.val_frequency:
        changes["eval_every"] = cc.val_frequency * per_epoch
    return dataclasses.replace(rc, **changes)


def build(cc: ClipConfig) -> tuple[nn.Module, ChineseTokenizer, dict]:
    """Model (random init; an HF tower with its local weights), tokenizer and the checkpoint meta."""
    tokenizer = tokenizer_for(cc)
    name = open_clip_name(cc.model, cc.text_model)
    with user_errors(ValueError):
        cfg = build_config(cc.model, tokenizer, cc.context_length, cc.image_size, cc.text_model)
        model = create(name, cfg, pretrained_text=True)
    context_length = cfg["text_cfg"]["context_length"]
    check_tokenizer(model, tokenizer, context_length)
    if cc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    hf_config = getattr(getattr(model, "text", None), "config", None)
    meta = {"kind": "clip", "name": name, "model_cfg": cfg, "tokenizer": tokenizer.backend.to_str(),
            "context_length": context_length, "image_size": image_size_of(model),
            "hf_config": json.loads(hf_config.to_json_string()) if hf_config is not None else None}
    return model, tokenizer, meta


def write_open_clip_files(run_dir: Path, model: nn.Module, tokenizer: ChineseTokenizer, meta: dict) -> None:
    """``open_clip_config.json`` + ``vocab.txt``: with the final ``model.safetensors`` a ``local-dir:`` model."""
    ensure_writable_dir(run_dir)
    visual = model.visual
    write_json(run_dir / "open_clip_config.json", {
        "model_cfg": meta["model_cfg"],
        "preprocess_cfg": {"size": meta["image_size"], "mean": list(visual.image_mean), "std": list(visual.image_std),
                           "interpolation": "bicubic", "resize_mode": "shortest"}})
    tokenizer.save(run_dir)


def train(cc: ClipConfig, rc: RuntimeConfig) -> dict:
    """Build data, model and task from the configs and run the shared trainer."""
    if not cc.train_data:
        raise UserError("--train-data is required (a CSV/JSONL/image folder/webdataset shards from form_data)")
    if cc.val_attributes and not cc.val_data:
        raise UserError("--val-attributes needs --val-data")
    labels = read_labels(cc.zeroshot_labels) if cc.zeroshot_labels else []
    if labels and not cc.val_data:
        raise UserError("--zeroshot-labels needs --val-data")
    if "{}" not in cc.zeroshot_template:
        raise UserError(f"--zeroshot-template must contain {{}} where the label goes, got {cc.zeroshot_template!r}")
    if cc.cache_images and (cc.random_crop or rc.workers):
        raise UserError("--cache-images needs --workers 0 and no --random-crop (cached images are fixed crops)")
    if cc.val_batch_size < 1:
        raise UserError(f"--val-batch-size must be >= 1, got {cc.val_batch_size}")
    torch.manual_seed(rc.seed)
    model, tokenizer, meta = build(cc)
    size = meta["image_size"]
    train_set = open_split(cc, cc.train_data, size, random_crop=cc.random_crop)
    listed = hasattr(train_set, "__len__")  # else a stream of webdataset shards: epochs of --train-num-samples
    if not listed and not rc.train_num_samples:
        raise UserError("--train-data is a stream of webdataset shards (no length): give --train-num-samples N, "
                        "the samples of an epoch over all processes")
    if cc.cache_images and not listed:
        raise UserError("--cache-images needs a listed data set (CSV / JSONL / image folder), not webdataset shards")
    if cc.cache_images:
        train_set = InMemory(train_set)
    val_set = open_split(cc, cc.val_data, size, flag="--val-data") if cc.val_data else None
    if cc.val_attributes:  # check the join now, not after training
        synthetic_attributes([val_set.image_path(i) for i in range(len(val_set))],
                             [val_set.caption(i) for i in range(len(val_set))], cc.val_attributes)
    rc = epoch_schedule(cc, rc, len(train_set) if listed else rc.train_num_samples,
                        int(os.environ.get("WORLD_SIZE", "1")))
    task = ClipTask(cc, model, tokenizer, meta["context_length"], meta, val_set, labels)
    config = {"runtime": to_dict(rc), "clip": to_dict(cc)}
    return Trainer(rc, task, train_set, collate_fn=collate, config=config).fit()
