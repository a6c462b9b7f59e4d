import torch

from pipeline.metrics import ece, image_ece


def test_public_functions_take_predictions_that_break_ties():
    """Uniform probabilities: without preds every pixel predicts class 0; preds decide."""
    probs = torch.full((2, 4, 3, 3), 0.25)
    labels = torch.full((2, 3, 3), 2)
    assert ece(probs, labels) == 0.25  # class 0 predicted, always wrong
    assert ece(probs, labels, preds=labels) == 0.75  # always right at confidence 0.25
    assert image_ece(probs, labels, preds=labels) == 0.75
    rows, flat = probs.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1)
    assert ece(rows, flat, preds=flat) == 0.75
