"""Focus regions: boxes, masks and arrays -> a flat fill outside, pixels inside untouched."""

import numpy as np
import pytest
from PIL import Image

from dymu.focus import apply_focus, apply_focus_all, focus_mask, parse_box, parse_fill
from conftest import load_image


def test_boxes_masks_and_arrays_give_the_same_region():
    box = (10, 5, 30, 25)
    mask = focus_mask((40, 30), box)
    assert mask.shape == (30, 40) and mask.sum() == 20 * 20 and mask[5:25, 10:30].all()
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    assert np.array_equal(focus_mask((40, 30), picture), mask)
    assert np.array_equal(focus_mask((40, 30), mask.astype(np.uint8)), mask)
    union = focus_mask((40, 30), [(0, 0, 5, 5), (35, 25, 99, 99)])  # clipped to the image
    assert union.sum() == 25 + 25


def test_fill_outside_pixels_inside_bit_identical():
    image = load_image("skimage_coffee.png")
    w, h = image.size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    out = np.asarray(apply_focus(image, box))
    original = np.asarray(image)
    inside = focus_mask(image.size, box)
    assert np.array_equal(out[inside], original[inside])
    assert (out[~inside] == 255).all()  # default fill: white
    mean = np.rint(original.reshape(-1, 3).mean(0))
    assert (np.asarray(apply_focus(image, box, "mean"))[~inside] == mean).all()
    assert (np.asarray(apply_focus(image, box, "#102030"))[~inside] == (16, 32, 48)).all()
    assert apply_focus(image, None) is image


def test_clear_focus_errors():
    with pytest.raises(ValueError, match="--focus expects x0,y0,x1,y1"):
        parse_box("1,2,3")
    assert parse_box("1, 2,3.5,4") == (1.0, 2.0, 3.5, 4.0)
    with pytest.raises(ValueError, match="focus box .* is empty"):
        focus_mask((10, 10), (5, 5, 5, 8))
    with pytest.raises(ValueError, match="lies outside the 10x10 image"):
        focus_mask((10, 10), (20, 20, 30, 30))
    with pytest.raises(ValueError, match="focus mask is 4x3 but the image is 10x10"):
        focus_mask((10, 10), np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="is not 'mean', r,g,b or a colour"):
        parse_fill("nocolour")
    with pytest.raises(ValueError, match="focus has 1 entries but there are 2 images"):
        apply_focus_all([Image.new("RGB", (4, 4))] * 2, [None])
