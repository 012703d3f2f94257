"""Bytes in and out: checkpoints and releases (:mod:`.checkpoint`), layout conversion between
the Wan / diffusers / streamgen key layouts (:mod:`.convert`), checkpoint family recognition
(:mod:`.families`), MP4 writing (:mod:`.video`) and action files and encoding
(:mod:`.actions`). Nothing here imports the engine."""
