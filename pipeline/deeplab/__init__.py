"""DeepLab verification: a standard segmentation network trained on the pseudo-masks of the
train split and evaluated on val (the usual WSSS check of pseudo-mask quality)."""
