"""Reading the original BriVL files: the yml config (``cfg/test_xyb.yml`` format), the BERT encoder's config + vocab,
and the checkpoint (``{'learnable': state_dict}`` or a bare state dict), loaded strictly into :class:`BriVL`.

``MODEL.ENCODER`` is looked up, first hit wins: a local directory (relative paths from the yml's folder) holding
``config.json`` (+ ``vocab.txt`` / ``tokenizer.json``); the same files in the local Hugging Face cache (never
downloaded); for the known Chinese BERT ids (``hfl/chinese-roberta-wwm-ext`` and kin) their published config
values, with the vocab from ``form_data.tokenizer`` (cn_clip's bert-base-chinese vocab). The BERT weights always
come from the checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import timm
import torch
import yaml
from torch import Tensor

from brivl_infer.encoder import BriVL
from brivl_infer.model import BriVLConfig
from form_data.tokenizer import ChineseTokenizer, load_tokenizer
from zh_t2i_base.cli import UserError
from zh_t2i_base.device import resolve_device
from zh_t2i_base.precision import PRECISIONS, check_precision

# config.json values of the published checkpoints (hidden dropout etc. do not matter at inference)
_BASE = {"vocab_size": 21128, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
         "layer_norm_eps": 1e-12, "pad_token_id": 0}
_LARGE = {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
KNOWN_ENCODERS = {
    "hfl/chinese-roberta-wwm-ext": _BASE, "hfl/chinese-bert-wwm-ext": _BASE, "hfl/chinese-bert-wwm": _BASE,
    "bert-base-chinese": _BASE, "google-bert/bert-base-chinese": _BASE, "hfl/chinese-roberta-wwm-ext-large": _LARGE,
}
ENCODER_HINT = "point MODEL.ENCODER at a local directory holding the BERT config.json (and vocab.txt)"
IMAGE_KEYS, TEXT_KEYS = "imgencoder.", "textencoder."


@dataclass
class DatasetConfig:
    """The yml's ``DATASET`` section: the extract CLI's defaults (``jsonpath`` resolved from the yml's folder)."""

    name: str = "XYBDataset_all"
    jsonpath: str = ""
    workers: int = 8


def _section(raw: dict, name: str, cls: type, path: Path) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: {name} must be a mapping of keys, got {type(section).__name__}")
    known = {f.name: f for f in fields(cls) if f.name != "bert"}
    unknown = sorted(k for k in section if str(k).lower() not in known)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown {name} key(s) {', '.join(map(str, unknown))}", stacklevel=3)
    out = {}
    for key, value in section.items():
        f = known.get(str(key).lower())
        if f is None:
            continue
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise UserError(f"{path}: {name}.{key} must be {f.type}, got {value!r}")
        if want is int and value < (0 if f.name == "workers" else 1):
            raise UserError(f"{path}: {name}.{key} must be a {'non-negative' if f.name == 'workers' else 'positive'} "
                            f"integer, got {value}")
        out[f.name] = float(value) if want == (int, float) else value
    return out


def read_config(path: str | os.PathLike) -> tuple[BriVLConfig, DatasetConfig]:
    """Parse an original-format yml (``MODEL:`` and ``DATASET:`` sections; missing keys take the official values)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict) or "MODEL" not in raw:
        raise UserError(f"{path}: not a BriVL config (no MODEL section)")
    cfg = BriVLConfig(**_section(raw, "MODEL", BriVLConfig, path))
    data = DatasetConfig(**_section(raw, "DATASET", DatasetConfig, path))
    if cfg.name != "VL":
        raise UserError(f"{path}: MODEL.NAME {cfg.name!r} is not supported (the released model is 'VL')")
    if cfg.max_text_len < 2:
        raise UserError(f"{path}: MODEL.MAX_TEXT_LEN must be >= 2 ([CLS] and [SEP]), got {cfg.max_text_len}")
    if not timm.is_model(cfg.cnn):
        raise UserError(f"{path}: MODEL.CNN {cfg.cnn!r} is not a timm model name")
    if data.name != "XYBDataset_all":
        raise UserError(f"{path}: DATASET.NAME {data.name!r} is not supported (only 'XYBDataset_all' jsonl)")
    if data.jsonpath:
        data.jsonpath = str(path.parent / data.jsonpath)
    return cfg, data


def _hf_cache_dir(repo_id: str) -> Path | None:
    """The local snapshot folder holding ``repo_id``'s config.json, without any network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_encoder(encoder: str, cfg_dir: Path) -> tuple[dict, Path | None]:
    """(BertConfig values, folder with vocab.txt/tokenizer.json or None) for ``MODEL.ENCODER``."""
    local = Path(encoder).expanduser()
    local = local if local.is_absolute() else cfg_dir / local
    folder = local if local.is_dir() else _hf_cache_dir(encoder)
    if folder is None:
        if encoder in KNOWN_ENCODERS:
            return dict(KNOWN_ENCODERS[encoder]), None
        raise UserError(f"MODEL.ENCODER {encoder!r}: no directory {local}, not in the local Hugging Face cache, and "
                        f"not a known encoder ({', '.join(KNOWN_ENCODERS)}); {ENCODER_HINT}")
    config = folder / "config.json"
    try:
        bert = json.loads(config.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"MODEL.ENCODER {encoder!r}: cannot read {config} ({e.strerror or e}); "
                        f"{ENCODER_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"MODEL.ENCODER {encoder!r}: {config} is not valid JSON ({e})") from None
    if not isinstance(bert, dict) or bert.get("model_type", "bert") != "bert":
        raise UserError(f"MODEL.ENCODER {encoder!r}: {config} is not a BERT config (model_type "
                        f"{bert.get('model_type') if isinstance(bert, dict) else None!r})")
    has_vocab = (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()
    return bert, folder if has_vocab else None


def read_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """The state dict of a checkpoint file: ``obj['learnable']`` or the bare dict, loaded on the CPU.

    ``torch.load(weights_only=True)``; a file that needs pickle is refused unless ``trust_checkpoint``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint and "global" in str(e).lower():  # the safe unpickler met a class or function
            raise UserError(f"{path} holds pickled Python objects that a safe load refuses; pass --trust-checkpoint "
                            f"(trust_checkpoint=True) only for a file from a source you trust") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({' '.join(str(e).split())[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ModuleNotFoundError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    state = obj.get("learnable", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict with a 'learnable' state dict, or a bare state dict of tensors")
    return state


def select_state(state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """The inference keys: ``imgencoder.*`` and ``textencoder.*`` (the ``*_mom`` copies are dropped), without BERT's
    ``embeddings.position_ids`` buffer (persistent in old transformers; checked to be 0, 1, 2, ...)."""
    keep = {}
    for key, value in state.items():
        if not key.startswith((IMAGE_KEYS, TEXT_KEYS)):
            continue
        if key.endswith("embeddings.position_ids"):
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise UserError(f"{source}: {key} is not 0, 1, 2, ... (a BERT variant this loader does not know)")
            continue
        keep[key] = value
    if not keep:
        sample = ", ".join(list(state)[:3]) or "(empty)"
        raise UserError(f"{source}: no imgencoder.* / textencoder.* keys (found {sample}); not a BriVL checkpoint")
    return keep


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_weights(model: BriVL, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load of :func:`select_state` output; a mismatch is a UserError naming the keys."""
    if model.folded:
        raise UserError("this BriVL's BatchNorms are folded for inference (load_brivl does that); "
                        "load weights into a model from build_model")
    state = select_state(state, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                   if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name} {_listing(keys)}" for name, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if keys]
        raise UserError(f"{source} does not match the config's model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def build_model(cfg: BriVLConfig, tokenizer: ChineseTokenizer | None = None, precision: str = "fp32") -> BriVL:
    """A randomly initialised BriVL for ``cfg`` (``cfg.bert`` filled in); inconsistent configs are a UserError."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for dim, heads, what in ((cfg.img_feature_dim, cfg.img_transformer_head, "IMG"),
                             (cfg.text_feature_dim, cfg.text_transformer_head, "TEXT")):
        if dim % heads:
            raise UserError(f"MODEL.{what}_FEATURE_DIM {dim} is not divisible by MODEL.{what}_TRANSFORMER_HEAD {heads}")
    try:
        model = BriVL(cfg, tokenizer, precision)
    except (ValueError, TypeError) as e:
        raise UserError(" ".join(str(e).split())) from None
    stride = (getattr(model.imgencoder.backbone, "feature_info", None) or [{}])[-1].get("reduction")
    if stride and cfg.img_size // stride < 2:
        raise UserError(f"MODEL.IMG_SIZE {cfg.img_size} gives {cfg.cnn} a feature map under 2x2 (stride {stride}); "
                        f"RoI pooling needs at least 2x2")
    if tokenizer is not None and tokenizer.vocab_size > model.textencoder.backbone.bert.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the BERT of "
                        f"{cfg.encoder} embeds only {model.textencoder.backbone.bert.config.vocab_size}")
    return model.eval()


def load_brivl(cfg_path: str | os.PathLike, checkpoint_path: str | os.PathLike,
               tokenizer: ChineseTokenizer | None = None, device: str | torch.device | None = None,
               trust_checkpoint: bool = False, precision: str = "fp32") -> BriVL:
    """A BriVL ready for inference from an original-format yml: config + encoder files + tokenizer, then the strict
    checkpoint load, eval mode, BatchNorms folded."""
    cfg_path = Path(cfg_path)
    cfg, _ = read_config(cfg_path)
    cfg.bert, vocab = resolve_encoder(cfg.encoder, cfg_path.parent)
    dev = resolve_device(device)
    check_precision(precision, dev)
    if not Path(checkpoint_path).is_file():
        raise UserError(f"checkpoint not found: {checkpoint_path}")
    if tokenizer is None:
        tokenizer = load_tokenizer(vocab)
    model = build_model(cfg, tokenizer, precision)
    load_weights(model, read_checkpoint(checkpoint_path, trust_checkpoint), str(checkpoint_path))
    return model.fold_batchnorm().to(dev)
