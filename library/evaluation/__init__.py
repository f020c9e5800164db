"""Evaluation: how well an LLLite controls the image (edge F1, SSIM), and the tiny model's procedural check."""
