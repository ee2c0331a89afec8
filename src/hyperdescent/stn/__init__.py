"""Self-tuning networks (MacKay et al. 2019; Δ-STN: Bae & Grosse 2020): best-response layers,
per-example augmentations and the alternating trainer. They tune what never enters the
optimizer's update (dropout, augmentation, penalty coefficients); optimizer hyperparameters
belong to hd.OnlineTuner."""

from . import augment, text
from .augment import Augmentation
from .layers import (
    HyperContext,
    HyperConv2d,
    HyperDropout,
    HyperEmbedding,
    HyperLinear,
    HyperLSTM,
    STNSequential,
    dropout,
    from_sequential,
)
from .replay import attach_dropout
from .trainer import OPTIMIZER_HPARAMS, STNTrainer

__all__ = ["HyperLinear", "HyperConv2d", "HyperLSTM", "HyperEmbedding", "HyperDropout",
           "HyperContext", "STNSequential", "from_sequential", "dropout", "Augmentation",
           "augment", "text", "STNTrainer", "OPTIMIZER_HPARAMS", "attach_dropout"]
