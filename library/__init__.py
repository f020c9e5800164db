"""Shared code of the SDXL ControlNet-LLLite training and generation scripts."""
