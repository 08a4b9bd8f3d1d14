"""Readers of exported patterns, shared by the recognizers of several families; they register nothing.

- `symbolic.py`: match at several trial sizes under symbolic dims, rewrite once for all;
- `unfold.py`: the exported F.unfold and the weighted sums of its views;
- `shifted_slices.py`: windows read as slices of one zero-padded tensor;
- `reduction.py`: ReduceSum and ReduceMean, their kind, axes and keepdims.
"""
