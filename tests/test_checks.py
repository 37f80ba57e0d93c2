"""qplug.checks.check_tensor: the content checks backends run on the statistics they load."""

from __future__ import annotations

import pytest
import torch

import qplug
from qplug.checks import check_tensor


def test_good_tensors_absent_ones_and_meta_ones_pass():
    check_tensor("s", torch.ones(4), floating=True, finite=True)
    check_tensor("g", torch.arange(4, dtype=torch.int32), low=0, high=4, dtypes=(torch.int32,))
    check_tensor("absent", None, floating=True, finite=True)
    check_tensor("meta", torch.empty(4, device="meta"), finite=True)


@pytest.mark.parametrize(
    ("tensor", "checks", "message"),
    [
        (torch.tensor([1.0, float("nan"), float("inf")]), {"finite": True}, "'x': 2 of 3 values are NaN or infinite"),
        (torch.ones(2, dtype=torch.int32), {"floating": True}, "'x' is int32; expected a floating-point dtype"),
        (torch.ones(2), {"dtypes": (torch.float16,)}, "'x' is float32; expected float16"),
        (torch.tensor([0, -1]), {"low": 0, "high": 4}, r"'x': values must lie in \[0, 4\), found \[-1, 0\]"),
        (torch.tensor([0, 4]), {"low": 0, "high": 4}, r"'x': values must lie in \[0, 4\), found \[0, 4\]"),
    ],
)
def test_each_failure_is_a_checkpoint_error_naming_the_tensor(tensor, checks, message):
    with pytest.raises(qplug.CheckpointError, match=message):
        check_tensor("x", tensor, **checks)
