"""Dataclass configs as CLI flags (+ an optional YAML/JSON file), and back to plain JSON-able dicts.

Every field ``foo_bar`` becomes ``--foo-bar`` (and the seed-compatible alias ``--foo_bar``); bools get
``--foo/--no-foo``; tuples take several values. Precedence: dataclass default < ``--config FILE`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from zh_t2i_base.cli import OUT_DIR, PathArg, UserError, finite_float
from zh_t2i_base.fileio import read_structured

T = TypeVar("T")


def path_field(arg: PathArg, default: str = "") -> Any:
    """A dataclass field holding a path: its flag (and its value in a --config file) is checked by ``arg``."""
    return dataclasses.field(default=default, metadata={"type": arg})


@dataclass
class RuntimeConfig:
    """What every training run has, whatever the model."""

    out_dir: str = path_field(OUT_DIR, "runs/train")  # run directory: checkpoints, metrics.jsonl, config.json, grids
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA where supported, else fp32) | fp32 | bf16 | fp16 (with GradScaler)
    batch_size: int = 32  # per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    max_time: float = 0.0  # stop (and save) after this many seconds of training; 0 = no limit
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 0.0  # max global grad norm per optimizer; 0 = off
    workers: int = 2  # DataLoader worker processes
    dataset_resampled: bool = False  # webdataset shards drawn with replacement per rank and worker (open_clip)
    train_num_samples: int = 0  # samples per epoch over all processes, for webdataset shards (required for them)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the torchrun processes (FSDP2, per block)
    fsdp_param_dtype: str = "fp32"  # fp32 | bf16: what FSDP gathers for compute (bf16: half the traffic; no autocast)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory
    channels_last: bool = False  # NHWC memory format for conv models (faster convolutions on CPU and recent GPUs)
    log_every: int = 10
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    sample_every: int = 0  # steps between image grids; 0 = only at the end
    resume: str = ""  # "latest" (in out_dir) or a checkpoint path
    report_to: str = "none"  # none | wandb (offline unless configured)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"lr must be in (0, {MAX_LR:g}], got {self.lr:g}")


MAX_LR = 1e3  # far above any usable learning rate; AdamW's step overflows float32 long before 1e39


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``Optional[str]`` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str | None = None,
                       defaults: dict | None = None) -> None:
    """One flag per field of ``cls``; --help shows each default (``defaults`` overrides the dataclass's)."""
    target = parser.add_argument_group(group or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = (defaults or {}).get(f.name, default)
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        help_text = (f.metadata or {}).get("help", " ")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{help_text} (default: {default})"}
        if tp is bool:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (tuple, list):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            target.add_argument(*names, nargs="+", type=inner, metavar=f.name.upper(), **kw)
        else:
            default_kind = finite_float() if tp is float else tp if tp in (int, str) else str
            kind = (f.metadata or {}).get("type") or default_kind
            target.add_argument(*names, type=kind, metavar=f.name.upper(), **kw)


def training_parser(prog: str, description: str, model_cls: type, defaults: dict,
                    group: str = "model and data") -> argparse.ArgumentParser:
    """The CLI of a trainer: ``--config``, one flag per field of ``model_cls`` and of :class:`RuntimeConfig` (with the
    package's own runtime ``defaults``)."""
    from zh_t2i_base.cli import ArgumentParser

    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML/JSON file of options (flags override it)")
    add_dataclass_args(p, model_cls, group)
    add_dataclass_args(p, RuntimeConfig, "run", defaults=defaults)
    return p


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    data = read_structured(path, "config file (option names to values)", yaml=True)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], values: dict, strict: bool = False) -> T:
    """Instantiate ``cls`` from the keys of ``values`` that are its fields (coercing lists to tuples)."""
    names = {f.name for f in fields(cls)}
    if strict:
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if k in names:
            if typing.get_origin(_base_type(hints[k])) is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {cls.__name__} options: {e}") from None


def parse_configs(parser: argparse.ArgumentParser, argv, *classes: type,
                  defaults: dict | None = None) -> tuple[argparse.Namespace, list]:
    """Parse ``argv`` into one instance of each dataclass. Precedence: dataclass defaults < ``defaults`` (a package's
    own, e.g. a higher lr for tokenizers) < ``--config FILE`` < explicit flags. A config file's values pass the same
    checks as the flags (type, range, path)."""
    args = parser.parse_args(argv)
    explicit = vars(args)
    config = explicit.get("config")
    from_file = load_config_file(config)
    known = set().union(*({f.name for f in fields(c)} for c in classes))
    unknown = sorted(k for k in from_file if k not in known and k not in explicit)
    if unknown:
        raise UserError(f"unknown option(s) in {config}: {', '.join(unknown)}")
    actions = {a.dest: a for a in parser._actions}
    from_file = {k: check_value(actions[k], v, f"{config}: option {k!r}") if k in actions else v
                 for k, v in from_file.items() if k not in explicit}
    merged = {**(defaults or {}), **from_file, **explicit}
    return args, [build(c, merged) for c in classes]


def check_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a config file, converted and checked as its flag's ``action`` would the same text."""

    def one(item: Any) -> Any:
        if isinstance(item, (dict, list, tuple, bool)) or item is None:
            raise UserError(f"{where}: expected {getattr(kind, '__name__', 'a value')}, got {item!r}")
        if kind is int and isinstance(item, float):
            raise UserError(f"{where}: expected an integer, got {item!r}")
        try:
            out = kind(str(item)) if kind is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            why = str(e) if isinstance(e, argparse.ArgumentTypeError) else \
                f"expected {'an integer' if kind is int else getattr(kind, '__name__', 'a value')}, got {item!r}"
            raise UserError(f"{where}: {why}") from None
        if action.choices is not None and out not in action.choices:
            raise UserError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
        return out

    kind = action.type
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(v) for v in items]
    return one(value)


def to_dict(obj) -> dict:
    """A dataclass as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
