"""Autograd Functions and torch.library custom ops around the Triton launchers.

ops/sru.py: the fused SRU; ops/cru.py: the fused CRU; ops/scconv.py: the whole
SCConv as one Function so its backward can recompute the SRU output from x.
"""
