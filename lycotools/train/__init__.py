"""`lycotools train`: fine-tune adapters, DreamBooth and textual inversion on a local SD checkpoint."""
