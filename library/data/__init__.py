"""Training data: dataset TOMLs, image/guide pairing, captions, buckets, and the latent/text caches."""
