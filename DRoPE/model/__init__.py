"""The D-RoPE masked autoencoder: D-RoPE attention, model, masking and checkpoints."""

from .checkpoint import CheckpointError, load_model, read_metadata, save_model
from .drope import DRoPEShapeError, drope_attention, drope_attention_naive, drope_distance
from .mae import (
    PRESETS,
    DRoPEMAE,
    EncoderOutput,
    MAEOutput,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    mask_lambda,
    model_config,
    patch_map_to_voxels,
)
from .masking import MASKING, MaskingError, diffusion_mask, fixed_ratio_spatial_mask, spatial_mask, strategy_for_epoch

__all__ = [
    "CheckpointError",
    "DRoPEMAE",
    "DRoPEShapeError",
    "EncoderOutput",
    "MAEOutput",
    "MASKING",
    "MaskingError",
    "ModelConfig",
    "ModelConfigError",
    "ModelInputError",
    "PRESETS",
    "diffusion_mask",
    "drope_attention",
    "drope_attention_naive",
    "drope_distance",
    "fixed_ratio_spatial_mask",
    "load_model",
    "mask_lambda",
    "model_config",
    "patch_map_to_voxels",
    "read_metadata",
    "save_model",
    "spatial_mask",
    "strategy_for_epoch",
]
