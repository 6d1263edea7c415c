"""The datasets: one module per dataset family, files -> class splits of images (or, for sinusoids,
a task distribution); base.py holds what they share."""
