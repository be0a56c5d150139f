"""Files in and out: latent files with their provenance (`latents`); atomic writes and image files ↔ tensors
live in `probflow.files` (below everything that computes), reachable here under their former names
(`probflow.io.atomic`, `probflow.io.images`)."""
