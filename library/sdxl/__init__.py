"""The SDXL base model: checkpoints in every common layout, key maps, weight files, text encoders, LoRA."""

# The deepest clip_skip: SDXL's first text encoder has 12 layers (its second has 32).
CLIP_SKIP_MAX = 12
