"""One module per model family: config dataclass, blocks, model, VARIANTS and PRETRAINED tables."""
