"""Helpers of `clipvqd eval`: the judge's aggregation (judging) and the sweep grid (sweep)."""
