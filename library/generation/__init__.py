"""Generation: options, planning, the denoising loop, samplers, Deep Shrink, Gradual Latent and upscalers."""
