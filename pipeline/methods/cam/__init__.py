"""The CAM baseline (Puzzle-CAM, Jo & Yu 2021): the classifier CSRM (paper 004) starts from, also a
method of its own (Table 2's first row: CAMs with a constant background score).

``model.CAMClassifier`` (in ``pipeline.methods.csrm.model``, shared with CSRM's classification
branch), the puzzle losses in ``puzzle``, the trainer plug-in and the predictor in ``method``.
"""
