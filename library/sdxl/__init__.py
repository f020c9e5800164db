"""The SDXL base model: checkpoints in every common layout, key maps, weight files, text encoders, LoRA."""
