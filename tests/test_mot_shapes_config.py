"""configs/mot_shapes.py's image token grids: which grid each size and option gets, and the
combinations it refuses (one line naming the options)."""
import math

import pytest

from configs import mot_shapes
from mmjax import config_validation


@pytest.mark.parametrize("arg, side, codes", [
    ("demo", 4, 2**24), ("demo,grid8", 8, 1000), ("demo,discrete", 8, 1000),
    ("demo,vq", 8, 1000), ("demo,edits", 4, 2**24), ("smoke", 8, 1000), ("smoke,grid4", 4, 2**24),
    ("cpu_hour", 4, 2**24), ("cpu_hour,grid8", 8, 1000)])
def test_grid_of_each_size_and_option(arg, side, codes):
    config = config_validation.validate(mot_shapes.get_config(arg))
    assert config_validation.image_side(config) == side
    assert math.prod(config.fsq.levels) == codes


@pytest.mark.parametrize("arg, message", [
    ("demo,grid4,discrete", r"option\(s\) \['discrete'\] need grid8"),
    ("demo,vq,grid4", r"option\(s\) \['vq'\] need grid8"),
    ("demo,grid4,grid8", r"options \['grid4', 'grid8'\] exclude each other")])
def test_grid_conflicts_are_refused(arg, message):
    with pytest.raises(ValueError, match=message):
        mot_shapes.get_config(arg)



@pytest.mark.parametrize("arg, document", [("demo", "one document"), ("demo,edits", "an edit document")])
def test_a_row_too_short_for_one_document_fails_in_validate(arg, document):
    """This once surfaced only in the model stage, after the data and tokenizer stages had run
    (minutes of work on the demo, hours on a pod)."""
    config = mot_shapes.get_config(arg)
    config.model.max_seq_len = 40
    with pytest.raises(config_validation.ConfigError,
                       match=rf"config\.model\.max_seq_len=40: {document} .* is longer than"):
        config_validation.validate(config)
