"""ViT-PCM (paper 001), the baseline of PC2M by the same authors: ``train.method: vitpcm``.

One network (``model.PatchClassifier`` with the ``model.HVBiLSTM`` conditioning) and two branches:

- main branch: the image at ``global_size`` (384), flipped left-right / up-down and transposed
  (each p = 0.5) and colour-jittered; its max-pooled patch predictions give L_MCE (eq. 1, 3);
- equivariance (ET) branch: another augmentation of the image, a crop of ``crop_size`` px (128,
  starting on patch multiples, with probability ``crop_probability``) or the whole image, scaled
  to a tile of ``global_size / 2`` (192) px and flipped / transposed; four tiles of the batch are
  merged 2 x 2 into one mosaic (the merge m), and the mosaic's predictions split back per tile.

L_ET (eq. 8) is the cross-entropy between each tile's predictions and the soft target: the main
image's predictions in inference mode (no dropout, stop-gradient), mapped into the tile's frame
(inverse of the main branch's flips, then the tile's crop, scale and flips: ``views.resample``
at the tile's patch centres), restricted to the image's labels, each class scaled to peak 1 and
renormalised per patch (the official code's ``merge_class_labels``). Total: eq. 9 plus the L2
penalty on the classifier kernel that the official code adds to its loss.

Values: the official code's (github.com/deepplants/ViT-PCM, configs/voc12.yaml, model.py), which
differ from paper 001 Sec. 6.1's text in three places: 1 warm-up epoch (text: 2), last 5 blocks
unfrozen (text: 4), classifier init N(0, 0.05) and L2 0.01 (text: standard Gaussian, 0.1).
"""
