"""PC2M training and inference (paper 000, Rossetti, Samà, Pirri): a ViT patch classifier trained
with image-level labels (weak) or clustering pseudo-labels (unsupervised), local-global matching
of optimal-transport pseudo-labels and area balancing."""
