"""Per-family pipeline presets for Wan2.1-T2V-1.3B causal students: sources and name guessing.

Each family's checkpoint runs with the chunk size, steps, sink/window and RoPE policy it was
trained with. The presets themselves are rows of the read-only table in
:mod:`streamgen.config.presets` (``FAMILY_PRESETS``, part of ``PIPELINE_PRESETS``), so
``PipelineConfig.from_name("longlive")`` and ``Pipeline.from_pretrained(path, config="longlive")``
find them whatever was imported first. ``guess_family(path)`` maps a checkpoint file name to a
family.

Sources and confidence (``FAMILY_NOTES``): self-forcing and longlive values are those of the
released inference configs (LongLive: ``local_attn_size: 12, sink_size: 3`` = 3 sink frames +
9 window frames, since streamgen's ``window_frames`` excludes the sink). The other families
follow their papers' descriptions; their exact release values are not verified here.
"""
from __future__ import annotations

import os
import re
from types import MappingProxyType
from typing import Mapping

from ..config.presets import FAMILY_PRESETS, SF_STEPS  # noqa: F401  (re-exported)

FAMILY_NOTES: Mapping[str, str] = MappingProxyType({
    "self-forcing": "verified against Self-Forcing's released inference config",
    "longlive": "verified against LongLive's inference config (local_attn_size 12 incl. sink 3)",
    "causvid": "from the CausVid paper/config (3 steps 1000/757/522, unwarped); not verified on a release",
    "reward-forcing": "from the paper's description (EMA sink, relative RoPE); window size not verified",
    "anchor-forcing": "from the paper's description (anchor region); sizes not verified",
    "rolling-forcing": "sink + rolling window only: Rolling Forcing's joint multi-frame denoising "
                       "schedule is not implemented; sizes not verified",
    "causal-forcing": "frame-wise chunks per the paper; step list assumed equal to Self-Forcing's",
})

# file-name patterns -> family (checked in order, on the lower-cased base name and parent dir)
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"long[-_]?live", "longlive"),
    (r"reward[-_]?forc", "reward-forcing"),
    (r"anchor[-_]?forc", "anchor-forcing"),
    (r"rolling[-_]?forc", "rolling-forcing"),
    (r"causal[-_]?forc", "causal-forcing"),
    (r"caus[-_]?vid", "causvid"),
    (r"self[-_]?forc", "self-forcing"),
)


def guess_family(path: str) -> str | None:
    """A family name from a checkpoint path (``.../LongLive-1.3B/models/longlive_base.pt``)."""
    parts = os.path.normpath(os.path.abspath(path)).lower().split(os.sep)[-3:]
    for part in reversed(parts):
        for pat, fam in _NAME_PATTERNS:
            if re.search(pat, part):
                return fam
    return None
