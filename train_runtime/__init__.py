"""The ONE training runtime every trainer of the toolkit uses (vae_train, dalle_train, clip_train, styled_vq).

* :mod:`train_runtime.config`      dataclass configs <-> CLI flags (+ optional YAML), defaults shown in --help;
* :mod:`train_runtime.distributed` plain ``python -m`` or ``torchrun`` (DDP: nccl on CUDA, gloo on CPU), devices;
* :mod:`train_runtime.optim`       AdamW without decay on norms/biases/embeddings, warmup + cosine/constant LR;
* :mod:`train_runtime.checkpoint`  atomic, complete, resumable checkpoints (weights_only loading), keep-last-N;
* :mod:`train_runtime.trainer`     the loop: precision, accumulation, clipping, logging, eval/sample hooks, signals.
"""

from train_runtime.config import RuntimeConfig
from train_runtime.trainer import Task, Trainer, TrainingDiverged

__all__ = ["RuntimeConfig", "Task", "Trainer", "TrainingDiverged"]
