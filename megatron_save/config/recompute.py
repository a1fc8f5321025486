"""Activation recompute of a trained model: which activations its backward recomputes instead of keeping."""

from __future__ import annotations

from dataclasses import dataclass

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class RecomputeSettings:
    """Megatron-Core's activation recompute (activation checkpointing) of one trained model; the results are the
    same, the backward runs the recomputed part's forward again."""

    granularity: str | None = None
    """null (keep every activation), full (keep only each layer's input and recompute whole layers in the
    backward: the least memory, about one more forward of the model) or selective (recompute only core attention,
    its softmax and score matrix: little memory on long sequences for little compute)."""
    method: str = "uniform"
    """full only: uniform (every layer recomputed, num_layers layers per recomputed chunk) or block (only the first
    num_layers layers of each pipeline stage recomputed, the rest keep their activations)."""
    num_layers: int = 1
    """full only: layers per recomputed chunk (uniform; must divide the layers of a pipeline stage) or layers
    recomputed on each pipeline stage (block); at most the layers of a pipeline stage."""

    @property
    def enabled(self) -> bool:
        """Whether the model recomputes anything."""
        return self.granularity is not None


def check_recompute(settings: RecomputeSettings, name: str, layers_per_stage: int | None = None) -> None:
    """Refuses bad recompute settings, naming the setting (``name`` is its path, e.g. ``policy.recompute``); with
    ``layers_per_stage`` (a model's layers / pipeline stages) also num_layers that the layout cannot take."""
    if settings.granularity is not None and settings.granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"{name}.granularity={settings.granularity!r} is not one of null, "
                         f"{', '.join(RECOMPUTE_GRANULARITIES)}")
    if settings.method not in RECOMPUTE_METHODS:
        raise ValueError(f"{name}.method={settings.method!r} is not one of {', '.join(RECOMPUTE_METHODS)}")
    if isinstance(settings.num_layers, bool) or not isinstance(settings.num_layers, int) or settings.num_layers < 1:
        raise ValueError(f"{name}.num_layers={settings.num_layers!r} must be an integer >= 1")
    if settings.granularity != "full":
        # Megatron-Core reads method and num_layers for full recompute only (selective recomputes core attention
        # in every layer): a value set here would silently do nothing.
        if settings.method != "uniform" or settings.num_layers != 1:
            raise ValueError(f"{name}.method={settings.method!r} and {name}.num_layers={settings.num_layers} apply "
                             f"to {name}.granularity=full only (got {settings.granularity!r}); leave them unset")
        return
    if layers_per_stage is None:
        return
    if settings.num_layers > layers_per_stage:
        raise ValueError(f"{name}.num_layers={settings.num_layers} exceeds the {layers_per_stage} transformer layers "
                         "of each pipeline stage")
    if settings.method == "uniform" and layers_per_stage % settings.num_layers:
        # Megatron-Core's uniform recompute takes chunks of num_layers layers from each stage's first layer on; a
        # last chunk that runs past the stage's end indexes a layer the stage does not have.
        raise ValueError(f"{name}.num_layers={settings.num_layers} with {name}.method=uniform must divide the "
                         f"{layers_per_stage} transformer layers of each pipeline stage")
