"""Native multimodal pre-training: ViT, MLP and LLM trained jointly on the mixed text + image-text stream."""
