"""BriVL-1.0 inference: the two towers of BAAI's dual encoder, with the original module names so that
``checkpoint['learnable']`` loads strictly.

Image: timm CNN ``forward_features`` -> RoI grid sampling (the original's affine θ with ``align_corners=False``, kept
as it is) -> 1x1 conv + G x G average -> L2 -> post-LN transformer (key-padding mask) -> masked mean -> MLP -> L2.
Text: BERT without an attention mask (it attends to [PAD], as the original) -> per-token L2 -> transformer ->
masked mean over the valid tokens -> MLP -> L2. The score is the dot product of the two unit vectors.

Padded RoI / token slots are masked keys and excluded from the mean, so their outputs never matter: both towers drop
the slots after the last valid one before the small transformers (exact up to float rounding; 1 RoI instead of 37
without boxes).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import BertConfig, BertModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BriVLConfig:
    """Every key of the original yml's ``MODEL`` section, lower-cased; defaults are the official
    ``cfg/test_xyb.yml``. ``bert`` holds the ``BertConfig`` values of ``encoder`` (its config.json)."""

    name: str = "VL"
    encoder: str = "hfl/chinese-roberta-wwm-ext"
    text_feature_dim: int = 768
    text_transformer_head: int = 4
    text_transformer_layer: int = 4
    max_text_len: int = 80
    cnn: str = "tf_efficientnet_b5_ns"
    img_size: int = 380
    img_feature_dim: int = 2048
    img_transformer_head: int = 4
    img_transformer_layer: int = 4
    max_img_len: int = 37
    box_grid: int = 6  # read by the original dataset and never used
    topk: int = 1  # training only
    queue_size: int = 9600  # training only
    momentum: float = 0.99  # training only
    temperature: float = 0.07  # training only
    grid_size: int = 4
    is_extract: bool = True  # the original's switch between the loss and the features; we only extract
    bert: dict = field(default_factory=dict)


class MLP(nn.Module):
    """The original ``FakeTransformer``: fc1 -> ReLU -> fc2."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def _encoder(d_model: int, heads: int, layers: int) -> nn.TransformerEncoder:
    """torch defaults as in the original: FFN 2048, ReLU, post-LN, sequence-first, no final norm."""
    layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=heads)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def _trim(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the slots after the last valid one of the batch (``x`` [B, L, D], ``mask`` [B, L] of 1/0)."""
    valid = (mask != 0).any(0).nonzero()
    keep = int(valid[-1]) + 1 if len(valid) else 1
    return x[:, :keep], mask[:, :keep]


def _attend_and_pool(att: nn.TransformerEncoder, x: Tensor, mask: Tensor) -> Tensor:
    """Transformer over ``x`` [B, L, D] with the key-padding mask ``mask == 0``, then the mean over ``mask == 1``."""
    x, mask = _trim(x, mask)
    x = att(x.transpose(0, 1), src_key_padding_mask=mask == 0).transpose(0, 1)
    m = torch.where(mask == 1, 1.0, 0.0).to(x.dtype)
    return (x * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1).unsqueeze(-1)


def roi_grid(boxes: Tensor, fmap_h: int, fmap_w: int, img_size: int, grid_size: int) -> Tensor:
    """Sampling grid [B, N, G, G, 2] (normalised x, y) of the original RoI pooling for ``boxes`` [B, N, 4].

    Boxes are (x1, y1, x2, y2) in resized-image pixels; the feature ratio uses the map height for both axes and θ
    assumes ``align_corners=True`` while the sampling runs with False, exactly as the original does.
    """
    if fmap_h < 2 or fmap_w < 2:
        raise ValueError(f"the feature map is {fmap_h}x{fmap_w}; RoI pooling needs at least 2x2 (raise MODEL.IMG_SIZE)")
    b, n = boxes.shape[:2]
    x1, y1, x2, y2 = (boxes.float() / (img_size / fmap_h)).unbind(-1)
    zero = torch.zeros_like(x1)
    theta = torch.stack((
        (x2 - x1) / (fmap_w - 1), zero, (x1 + x2 - fmap_w + 1) / (fmap_w - 1),
        zero, (y2 - y1) / (fmap_h - 1), (y1 + y2 - fmap_h + 1) / (fmap_h - 1),
    ), dim=-1).view(b * n, 2, 3)
    grid = F.affine_grid(theta, [b * n, 1, grid_size, grid_size], align_corners=False)
    return grid.view(b, n, grid_size, grid_size, 2)


def roi_sample(fmap: Tensor, boxes: Tensor, img_size: int, grid_size: int) -> Tensor:
    """Bilinear samples [B, N, C, G, G] of ``fmap`` [B, C, h, w] at the RoI grids (zero padding outside)."""
    b, c, h, w = fmap.shape
    n, g = boxes.shape[1], grid_size
    grid = roi_grid(boxes, h, w, img_size, g).to(fmap.dtype).view(b, n * g, g, 2)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, c, n, g, g).transpose(1, 2)


class ImageEncoder(nn.Module):
    """The original ``ImgLearnableEncoder`` (inference only)."""

    cpu_cnn_batch = 1

    def __init__(self, cfg: BriVLConfig):
        super().__init__()
        self.cfg = cfg
        with warnings.catch_warnings():  # e.g. "Mapping deprecated model name tf_efficientnet_b5_ns to ..."
            warnings.filterwarnings("ignore", message="Mapping deprecated model name")
            self.backbone = timm.create_model(cfg.cnn, pretrained=False)
        self.backbone.to(memory_format=torch.channels_last)  # about 2x faster depthwise convs on CPU; same numbers
        if self.backbone.num_features != cfg.img_feature_dim:
            raise ValueError(f"MODEL.IMG_FEATURE_DIM is {cfg.img_feature_dim} but {cfg.cnn} gives "
                             f"{self.backbone.num_features} feature channels")
        d = cfg.img_feature_dim
        self.learnable = nn.ModuleDict({
            "imgFC": MLP(d, d, d),
            "imgAtt": _encoder(d, cfg.img_transformer_head, cfg.img_transformer_layer),
            "max_pool": nn.Sequential(nn.Conv2d(d, d, kernel_size=1), nn.AvgPool2d(cfg.grid_size, stride=1)),
        })

    def forward(self, images: Tensor, boxes: Tensor, mask: Tensor) -> Tensor:
        """``images`` [B, 3, S, S] normalised, ``boxes`` [B, N, 4], ``mask`` [B, N] 1/0 -> [B, D] (not normalised)."""
        images = images.contiguous(memory_format=torch.channels_last)
        # On CPU the CNN runs a few images at a time (its activations then stay in cache: measured 1.3-2x faster
        # per image than batch 32) and everything after it on the whole batch (the transformer's weights are read
        # once per batch, not once per image).
        step = self.cpu_cnn_batch if images.device.type == "cpu" else len(images)
        fmap = torch.cat([self.backbone.forward_features(images[i:i + step]) for i in range(0, len(images), step)])
        boxes, mask = _trim(boxes, mask)
        b, n = boxes.shape[:2]
        samples = roi_sample(fmap, boxes, self.cfg.img_size, self.cfg.grid_size)
        x = self.learnable["max_pool"](samples.reshape(b * n, *samples.shape[2:])).view(b, n, -1)
        x = F.normalize(x, p=2, dim=-1)
        return self.learnable["imgFC"](_attend_and_pool(self.learnable["imgAtt"], x, mask))


class BertBackbone(nn.Module):
    """Keeps the original attribute path ``backbone.bert``; calls BERT without an attention mask."""

    def __init__(self, bert_config: dict):
        super().__init__()
        self.bert = BertModel(BertConfig(**bert_config), add_pooling_layer=True)

    def forward(self, ids: Tensor) -> Tensor:
        return self.bert(input_ids=ids).last_hidden_state


class TextEncoder(nn.Module):
    """The original ``TextLearnableEncoder`` (inference only)."""

    def __init__(self, cfg: BriVLConfig):
        super().__init__()
        self.backbone = BertBackbone(cfg.bert)
        hidden = self.backbone.bert.config.hidden_size
        if hidden != cfg.text_feature_dim:
            raise ValueError(f"MODEL.TEXT_FEATURE_DIM is {cfg.text_feature_dim} but the BERT of "
                             f"{cfg.encoder} has hidden size {hidden}")
        self.learnable = nn.ModuleDict({
            "textFC": MLP(cfg.text_feature_dim, cfg.img_feature_dim, cfg.img_feature_dim),
            "textAtt": _encoder(cfg.text_feature_dim, cfg.text_transformer_head, cfg.text_transformer_layer),
        })

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids`` [B, T] ([CLS] ... [SEP] [PAD]...), ``mask`` [B, T] 1/0 -> [B, D] (not normalised)."""
        x = F.normalize(self.backbone(ids), p=2, dim=-1)
        return self.learnable["textFC"](_attend_and_pool(self.learnable["textAtt"], x, mask))


ImageInput = Image.Image | str | os.PathLike


class BriVLTowers(nn.Module):
    """Both inference towers (state-dict keys ``imgencoder.*`` / ``textencoder.*`` as in ``checkpoint['learnable']``),
    on preprocessed tensors (see :mod:`brivl_infer.preprocess`); :class:`brivl_infer.encoder.BriVL` adds the
    preprocessing, batching, precision and scoring."""

    def __init__(self, cfg: BriVLConfig):
        super().__init__()
        self.config = cfg
        self.imgencoder = ImageEncoder(cfg)
        self.textencoder = TextEncoder(cfg)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_features(self, images: Tensor, boxes: Tensor, mask: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, D] of preprocessed tensors."""
        return F.normalize(self.imgencoder(images, boxes, mask).float(), p=2, dim=-1)

    def text_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """L2-normalised text embeddings [B, D] of token ids and their validity mask."""
        return F.normalize(self.textencoder(ids, mask).float(), p=2, dim=-1)

    def forward(self, images: Tensor, boxes: Tensor, img_mask: Tensor, ids: Tensor, text_mask: Tensor
                ) -> tuple[Tensor, Tensor]:
        """The original ``extract``: (image embeddings, text embeddings) of a paired batch."""
        return self.image_features(images, boxes, img_mask), self.text_features(ids, text_mask)
