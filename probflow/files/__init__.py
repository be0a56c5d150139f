"""Plain files, below everything that computes: atomic writes (`atomic`) and image files ↔ tensors (`images`).
They know no model, solver or grid (the latent format, which does, is `probflow.io.latents`)."""
