"""emim_reference's keyword options: chunk_pairs is refused, naming it, unless None or a positive int (0 used
to fail inside range(), a negative value in torch.cat, and True or a tensor were taken as a number).
That valid values give the unchunked result is tests/test_reference.py's chunking test."""

import pytest
import torch

from emim_triton import emim_reference
from helpers import make_inputs

INPUTS = make_inputs(2, 4, 3, 3, 1, 16, 3)


@pytest.mark.parametrize("chunk_pairs", [0, -1])
def test_chunk_pairs_below_one_is_a_value_error(chunk_pairs):
    with pytest.raises(ValueError, match=rf"chunk_pairs must be an int >= 1.*got {chunk_pairs}$"):
        emim_reference(**INPUTS, chunk_pairs=chunk_pairs)


@pytest.mark.parametrize("chunk_pairs", [2.0, "2", True, torch.tensor(2)], ids=["float", "str", "bool", "tensor"])
def test_chunk_pairs_not_an_int_is_a_type_error(chunk_pairs):
    with pytest.raises(TypeError, match=r"chunk_pairs must be an int >= 1"):
        emim_reference(**INPUTS, chunk_pairs=chunk_pairs)

