"""What the scheduler keeps per session (:class:`StreamSlot`), what one step hands a session
(:class:`Chunk`), and the refusal when there is no room (:class:`Busy`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from streamgen.errors import StreamgenError


class Busy(StreamgenError):
    """No capacity: every slot is taken (``reason="full"``) or another session would push the
    batch below real time (``reason="capacity"``)."""

    def __init__(self, message: str, reason: str = "full"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Chunk:
    """What one step produced for one session."""

    first_frame: int          # stream index of frames[0]
    frames: np.ndarray        # uint8 [T, H, W, 3]
    action_seq: int | None    # client seq of the action these frames reflect
    chunk_index: int
    step_ms: float            # wall time of the batched step (model + decode)
    batch: int                # sessions in that step
    done_at: float            # time.monotonic() when the frames existed


@dataclass(eq=False)
class StreamSlot:
    """The scheduler's view of one session (created by :meth:`Batcher.open`)."""

    id: str
    prompt: str
    seed: int
    on_chunk: Callable[[Chunk], None]
    on_end: Callable[[str, str], None]
    on_error: Callable[[str, str], None] | None = None    # non-fatal (a prompt switch that failed)
    start: str = "noise"                                  # "noise" | "world"
    action: tuple = (None, None)              # (validated action dict | None, seq | None)
    row: int | None = None
    closed: bool = False
    frames: int = 0
    chunks: int = 0
    generator: Any = None
    vae_state: Any = None
    latents: dict = field(default_factory=dict)
    start_frames: np.ndarray | None = None
    # control path (guarded by the Prep's / the Batcher's locks)
    want_join: bool = False
    want_prompt: str | None = None
    queued: bool = False
    ready_join: Any = None                    # JoinPrep | Exception
    ready_prompt: tuple | None = None         # (prompt, kv)
    in_ready: bool = False
    switched_at: int = -1                     # step index of the last applied prompt switch

    @property
    def start_source(self) -> str:
        return "world renderer" if self.start == "world" else "noise"
