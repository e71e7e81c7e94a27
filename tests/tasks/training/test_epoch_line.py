"""The per-epoch log line: validation Dice only when the epoch had validation (folds train without it)."""
from octseg.tasks.training.train import epoch_line
from octseg.unet.train import EpochStats


def test_epoch_line_with_validation():
    line = epoch_line(EpochStats(epoch=3, train_loss=0.25, seconds=1.3, val_dice={1: 0.71234}))
    assert line == "epoch 3: loss 0.2500, val Dice {1: 0.7123} (1.3 s)"


def test_epoch_line_without_validation_says_nothing_of_it():
    line = epoch_line(EpochStats(epoch=3, train_loss=0.25, seconds=1.0))
    assert "val" not in line and line == "epoch 3: loss 0.2500 (1.0 s)"

