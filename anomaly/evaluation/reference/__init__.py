"""The supervised reference (`anostyle reference`): what the validation labels buy.

efficientnet.py  EfficientNet-Lite0 with the packaged ImageNet weights (the `reference` extra)
small_cnn.py     a small CNN trained from scratch (no extra package)
classifier.py    logistic regression, its C chosen by lesion-grouped CV inside validation
run.py           the command: features (cached), fit on val, score test, reference.xlsx
"""
