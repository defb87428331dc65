"""Fine-tuning Hallo3 as the release trains it (docs/model.md §10; docs/training.md): the training step and the
trainable sets (:mod:`.step`), the recipe's numbers and schedules (:mod:`.recipe`)."""

from hallo3_cli.training.recipe import (
    RELEASE,
    Recipe,
    decays,
    ema_decay,
    ema_decay_float32,
    learning_rate,
    lr_lambda,
    sample_timesteps,
    timestep_band,
    weight_decay_groups,
)
from hallo3_cli.training.step import (
    RELEASE_RULES,
    TrainingForward,
    TrainRule,
    official_parameter_names,
    trainable_parameters,
    training_forward,
    training_loss,
)

__all__ = [
    "RELEASE",
    "RELEASE_RULES",
    "Recipe",
    "TrainRule",
    "TrainingForward",
    "decays",
    "ema_decay",
    "ema_decay_float32",
    "learning_rate",
    "lr_lambda",
    "official_parameter_names",
    "sample_timesteps",
    "timestep_band",
    "trainable_parameters",
    "training_forward",
    "training_loss",
    "weight_decay_groups",
]
