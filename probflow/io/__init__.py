"""Files in and out: atomic writes (`atomic`), image files ↔ tensors (`images`), latent files with their
provenance (`latents`)."""
