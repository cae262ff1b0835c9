"""Input checks of the grouped expert computation: ``counts`` must describe the rows of ``x`` (one entry per
matrix, non-negative, summing to the rows), on every branch, without reading GPU values in the hot path."""
import pytest
import torch
import torch.nn.functional as F

from moe_lab.experts import Experts, check_counts, grouped_mm

FUSED = [False, None] + ([True] if hasattr(F, "grouped_mm") else [])
BAD = {
    "3 groups for 2 matrices": (torch.tensor([1, 1, 4]), "shape \\(3,\\)"),
    "4 rows of 6": (torch.tensor([1, 1]), "got \\[1, 1\\]"),
    "4 rows of 6 in 2 groups": (torch.tensor([2, 2]), "got \\[2, 2\\]"),
    "negative": (torch.tensor([8, -2]), "got \\[8, -2\\]"),
    "float": (torch.tensor([3.0, 3.0]), "dtype torch.float32"),
    "bool": (torch.tensor([True, True]), "dtype torch.bool"),
    "2-D": (torch.tensor([[3, 3]]), "shape \\(1, 2\\)"),
}


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_grouped_mm_rejects_counts_that_do_not_match_its_operands(case, fused):
    counts, detail = BAD[case]
    with pytest.raises(ValueError, match=f"counts must have 2 entries summing to the 6 rows .*{detail}"):
        grouped_mm(torch.randn(6, 3), torch.randn(2, 3, 2), counts, fused=fused)


def test_grouped_mm_counts_must_be_a_tensor():
    with pytest.raises(TypeError, match="counts must have 2 entries.*got list"):
        grouped_mm(torch.randn(6, 3), torch.randn(2, 3, 2), [3, 3])


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_forward_grouped_rejects_bad_counts(case, fused):
    counts, detail = BAD[case]
    experts = Experts(2, 3, 4)
    with pytest.raises(ValueError, match=f"counts must have 2 entries summing .*{detail}"):
        experts.forward_grouped(torch.randn(6, 3), counts, fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_good_counts_with_zeros_match_per_group_matmuls(fused):
    """Valid counts (zeros and int32 included) still give ``x_e @ w[e]`` per group (reference: a Python loop)."""
    x, w = torch.randn(7, 16), torch.randn(3, 16, 8)  # F.grouped_mm wants 16-byte aligned rows
    for counts in (torch.tensor([4, 0, 3]), torch.tensor([0, 7, 0], dtype=torch.int32)):
        starts = [0, *torch.cumsum(counts, 0).tolist()]
        expected = torch.cat([x[a:b] @ w[e] for e, (a, b) in enumerate(zip(starts, starts[1:]))])
        torch.testing.assert_close(grouped_mm(x, w, counts, fused=fused), expected)


def test_check_counts_reads_values_only_where_that_is_free():
    """Off the CPU only shape and dtype are checked (reading values would be a host sync) unless anomaly mode
    is on; a meta tensor stands in for a GPU one (its values cannot be read at all)."""
    assert check_counts(torch.tensor([2, 4]), 2, 6) == [2, 4]
    meta = torch.empty(2, dtype=torch.int64, device="meta")
    assert check_counts(meta, 2, 6) is None
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        check_counts(meta, 3, 6)
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="got \\[2, 2\\]"):
        check_counts(torch.tensor([2, 2]), 2, 6)
