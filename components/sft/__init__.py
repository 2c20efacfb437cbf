"""Supervised fine-tuning on chat data (packing, square averaging, JPEG augmentation)."""
