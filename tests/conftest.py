"""Test setup: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, first.
"""
import os

try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
