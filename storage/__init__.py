"""Every on-disk format of glipctl, turned into (or from) the grounded sample. No torch, no Ray."""
