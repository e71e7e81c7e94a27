"""Training refuses masks with a class the network cannot predict, naming the volume that holds it."""
import numpy as np
import pytest

from octseg.tasks.training.train import check_volume_classes
from octseg.unet.bscans import BScanSet
from octseg.unet.config import UNetConfig


def test_a_class_the_network_cannot_predict_is_named_with_its_volume() -> None:
    labels = np.zeros((1, 8, 8), np.int64)
    sets = {"a": BScanSet(np.zeros((1, 8, 8), np.float32), labels, None),
            "c": BScanSet(np.zeros((1, 8, 8), np.float32), labels + 5, None)}
    with pytest.raises(ValueError, match="volume 'c': its masks hold class 5 .* --classes 6"):
        check_volume_classes(sets, UNetConfig(out_channels=2))
    check_volume_classes({"a": sets["a"]}, UNetConfig(out_channels=2))
