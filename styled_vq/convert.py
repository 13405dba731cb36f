"""Import checkpoints of the original Styled_vae_vq training (``model_{epoch}.pt``: a DDP ``state_dict`` with keys
prefixed ``module.`` and the original names, typos included: ``progject_mean``, ``afer_progject``, ``ln_ecoder_1``,
``resblocks_exper.*.layers.i``, ``decoder.resblocks.*.{ln_11, ln_22, condation_1}`` ...).

Every original key must map onto our model and every weight of ours must come from the file (strict), except the
decoder's ``condition_linear`` layers, which the original creates but never uses (they are checked and dropped).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from vae_train.styled import StyledVQ, StyledVQConfig
from zh_t2i_base.cli import UserError, user_errors

# original block sub-keys -> ours (encoder blocks, decoder final blocks, decoder condition blocks)
_BLOCK = [(r"attn1?\.in_proj_weight", "attn.qkv.weight"), (r"attn1?\.in_proj_bias", "attn.qkv.bias"),
          (r"attn1?\.out_proj\.(weight|bias)", r"attn.proj.\1"), (r"(ln_1|ln_2)\.(weight|bias)", r"\1.\2"),
          (r"mlp\.(c_fc|c_proj)\.(weight|bias)", r"mlp.\1.\2")]
_COND = _BLOCK + [(r"ln_11\.(weight|bias)", r"cond_norms.0.\1"), (r"ln_22\.(weight|bias)", r"cond_norms.1.\1"),
                  (r"condation_(1|2)\.(weight|bias)", r"slot_proj_\1.\2"),
                  (r"(norm1|norm2)\.(linear|norm)\.(weight|bias)", r"\1.\2.\3")]
_TOP = [("patch_embed.weight", "encoder.patch_embed.weight"), ("patch_embed.bias", "encoder.patch_embed.bias"),
        ("class_embedding", "encoder.cls_embed"), ("positional_embedding", "encoder.pos_embed"),
        ("query_embedding", "encoder.query_embed"), ("V2", "bottleneck.proto_embed"),
        ("decoder.positional_embedding", "decoder.pos_embed")]
_TOP_MODULES = [("ln_ecoder_1", "encoder.ln_pre"), ("ln_before_project_", "encoder.ln_post"),
                ("progject_mean", "encoder.proj"), ("ln_cosin", "bottleneck.ln"), ("afer_progject", "up_proj"),
                ("decoder.pre_post", "decoder.ln_pre"), ("decoder.lin_post", "decoder.ln_post"),
                ("decoder.linear", "decoder.head"), ("decoder.cov", "decoder.refiner.conv_in"),
                ("decoder.norm_in", "decoder.refiner.norm_in"), ("decoder.norm_out", "decoder.refiner.norm_out"),
                ("decoder.conv_out", "decoder.refiner.conv_out"), ("decoder.ResnetBlock", "decoder.refiner.res")]
_EXPERT = re.compile(r"resblocks_exper\.(\d+)\.layers\.(\d+)\.(c_fc|c_proj)\.(weight|bias)$")
_UNUSED = re.compile(r"decoder\.resblocks\.\d+\.condition_linear\.(weight|bias)$")
_CODEBOOK = "quantize.embedding.weight"


def _map_block(rest: str, table) -> str | None:
    for pattern, repl in table:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, repl, rest)
    return None


def map_key(key: str) -> str | None:
    """Our name for one original key (expert-MLP, codebook and unused keys are handled separately); None if unknown."""
    for old, new in _TOP:
        if key == old:
            return new
    for old, new in _TOP_MODULES:
        if key.startswith(old + "."):
            return new + key[len(old):]
    for prefix, ours, table in (("resblocks_exper", "encoder.expert_blocks", _BLOCK),
                                ("resblocks", "encoder.blocks", _BLOCK),
                                ("decoder.final_block", "decoder.final_blocks", _BLOCK),
                                ("decoder.resblocks", "decoder.cond_blocks", _COND)):
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.+)$", key)
        if m:
            rest = _map_block(m.group(2), table)
            return None if rest is None else f"{ours}.{m.group(1)}.{rest}"
    return None


def _count(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def infer_config(state: dict[str, Tensor], version: str | None = None, **sizes) -> StyledVQConfig:
    """The model configuration an original state dict implies. Attention heads and GroupNorm groups are not visible
    in the weights: they default to the original's (16 encoder heads, decoder width // 64, 8 groups)."""
    try:
        width, _, patch, _ = state["patch_embed.weight"].shape
        tokens = state["query_embedding"].shape[0]
        cond = _count(state, "decoder.resblocks")
        grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
        cov = state["decoder.cov.weight"].shape
        inferred = {
            "version": version or ("v2" if "V2" in state else "v1"), "image_size": grid * patch, "patch_size": patch,
            "width": width, "mlp_ratio": state["resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            "dense_blocks": _count(state, "resblocks"), "expert_blocks": _count(state, "resblocks_exper"),
            "tokens_per_block": tokens // max(cond, 1), "cond_blocks": cond,
            "emb_dim": state["progject_mean.weight"].shape[0], "decoder_width": state["afer_progject.weight"].shape[0],
            "final_blocks": _count(state, "decoder.final_block"), "refiner_channels": cov[0],
            "refiner_kernel": cov[2], "codebook_size": state[_CODEBOOK].shape[0]}
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"not a Styled_vae_vq state dict (missing or odd entry: {e})") from None
    unknown = sorted(set(sizes) - set(StyledVQConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown size option(s): {', '.join(unknown)}")
    try:
        return StyledVQConfig(**{**inferred, **sizes})
    except (TypeError, ValueError) as e:
        raise UserError(f"bad Styled-VQ sizes: {e}") from None


def convert_state_dict(state: dict[str, Tensor], cfg: StyledVQConfig) -> tuple[dict[str, Tensor], Tensor]:
    """Original (prefix-free) state dict -> (our state dict without the codebook, the stored codebook)."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, str, str], dict[int, Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in state.items():
        if key == _CODEBOOK or _UNUSED.match(key):
            continue
        m = _EXPERT.match(key)
        if m:
            experts[(int(m.group(1)), m.group(3), m.group(4))][int(m.group(2))] = value
            continue
        ours = map_key(key)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    if unknown:
        raise UserError(f"{len(unknown)} original key(s) have no place in a {cfg.version} model, e.g. {unknown[:3]} "
                        f"(wrong --version?)")
    names = {("c_fc", "weight"): "fc_weight", ("c_fc", "bias"): "fc_bias", ("c_proj", "weight"): "proj_weight",
             ("c_proj", "bias"): "proj_bias"}
    for (block, layer, kind), per_token in experts.items():
        if sorted(per_token) != list(range(cfg.seq_len)):
            raise UserError(f"resblocks_exper.{block}: expected {cfg.seq_len} expert MLPs, found {len(per_token)}")
        stacked = torch.stack([per_token[i] for i in range(cfg.seq_len)])
        out[f"encoder.expert_blocks.{block}.experts.{names[(layer, kind)]}"] = (
            stacked.flatten() if kind == "bias" else stacked)
    return out, state[_CODEBOOK]


def load_original_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """An original checkpoint file as a prefix-free state dict (``module.`` stripped; weights_only loading)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"original checkpoint not found: {p}")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise UserError(f"{p}: not a loadable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{p}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def from_original(path: str | os.PathLike, version: str | None = None, codebook: str | os.PathLike | Tensor | None
                  = None, **sizes) -> StyledVQ:
    """Load an original Styled_vae_vq checkpoint strictly into a :class:`StyledVQ` (eval mode).

    ``version``: 'v1' or 'v2' (None: v2 if the file has the ``V2`` prototypes). ``codebook``: None for a stage-1
    model (the stored ``quantize.embedding.weight`` is random unless k-means centres were copied in), ``"embedded"``
    to use that stored table, or k-means centres (a tensor or a ``k_means.pt`` file of shape [K, emb_dim]).
    ``sizes``: StyledVQConfig fields that the weights do not show (``heads``, ``decoder_heads``, ``refiner_groups``)
    or that should be checked.
    """
    if version not in (None, "v1", "v2"):
        raise UserError(f"version must be v1 or v2, got {version!r}")
    state = load_original_state(path)
    cfg = infer_config(state, version, **sizes)
    ours, stored_codebook = convert_state_dict(state, cfg)
    model = StyledVQ(cfg)
    expected = {k for k in model.state_dict() if k != "codebook"}
    missing, extra = sorted(expected - ours.keys()), sorted(ours.keys() - expected)
    if missing or extra:
        raise UserError(f"{path}: does not match a {cfg.version} model: missing {missing[:3]}, unexpected {extra[:3]}")
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ours.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"{path}: weight shapes do not match the sizes ({bad[0]}); pass the right sizes")
    model.load_state_dict({**ours, "codebook": own["codebook"]}, strict=True)
    if codebook is not None:
        if isinstance(codebook, str) and codebook == "embedded":
            centres = stored_codebook
        elif isinstance(codebook, Tensor):
            centres = codebook
        else:
            centres = _load_centres(codebook)
        with user_errors(ValueError):
            model.set_codebook(centres.float())
    return model.eval()


def _load_centres(path: str | os.PathLike) -> Tensor:
    """k-means centres from a file: a tensor (the original's ``k_means.pt``) or our ``{"centres": ...}``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"codebook file not found: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a loadable codebook ({type(e).__name__})") from None
    centres = obj.get("centres") if isinstance(obj, dict) else obj
    if not isinstance(centres, Tensor):
        raise UserError(f"{path}: expected a [K, emb_dim] tensor or a dict with 'centres'")
    return centres
