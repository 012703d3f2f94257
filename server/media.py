"""Media encoding for the stream protocol: the binary frame header, JPEG frames, fMP4 H.264.

Every binary server->client message starts with a fixed 24-byte little-endian header
(protocol version 1, see PROTOCOL.md)::

    offset size field
    0      4    magic  b"SGF1"
    4      1    kind   1 = JPEG frame, 2 = fMP4 init segment, 3 = fMP4 media fragment
    5      1    flags  bit 0: key frame (JPEG: always; fMP4: IDR)
    6      2    reserved (0)
    8      4    frame  uint32 stream frame index (init segment: 0)
    12     4    action_seq  uint32 client "seq" of the action the frame reflects (0xFFFFFFFF: none)
    16     4    chunk  uint32 index of the chunk the frame was generated in
    20     4    gen_ms uint32 ms from the end of that chunk's generation to sending (queue delay)

followed by the payload (a JPEG file, or ISO-BMFF boxes to append to an MSE SourceBuffer).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SGF1"
HEADER = struct.Struct("<4sBBHIIII")
HEADER_BYTES = HEADER.size            # 24
KIND_JPEG, KIND_INIT, KIND_FRAGMENT = 1, 2, 3
NO_SEQ = 0xFFFFFFFF
FLAG_KEY = 1


@dataclass
class FrameHeader:
    kind: int
    flags: int
    frame: int
    action_seq: int | None
    chunk: int
    gen_ms: int


def pack_header(kind: int, frame: int = 0, action_seq: int | None = None, chunk: int = 0,
                gen_ms: int = 0, flags: int = 0) -> bytes:
    seq = NO_SEQ if action_seq is None else int(action_seq) & 0xFFFFFFFF
    return HEADER.pack(MAGIC, kind, flags, 0, frame & 0xFFFFFFFF, seq, chunk & 0xFFFFFFFF,
                       max(0, min(int(gen_ms), 0xFFFFFFFF)))


def unpack_header(data: bytes) -> tuple[FrameHeader, bytes]:
    """Split a binary message into its header and payload (raises ValueError if malformed)."""
    if len(data) < HEADER_BYTES:
        raise ValueError(f"binary message of {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, kind, flags, _, frame, seq, chunk, gen_ms = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}; expected {MAGIC!r}")
    return FrameHeader(kind, flags, frame, None if seq == NO_SEQ else seq, chunk, gen_ms), data[HEADER_BYTES:]


class JpegEncoder:
    codec = "jpeg"

    def __init__(self, quality: int = 85):
        self.quality = int(quality)

    def header_messages(self) -> list[bytes]:
        return []

    def encode(self, frame: np.ndarray, index: int, action_seq, chunk: int, gen_ms: int) -> list[bytes]:
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
        return [pack_header(KIND_JPEG, index, action_seq, chunk, gen_ms, FLAG_KEY) + buf.getvalue()]

    def close(self) -> list[bytes]:
        return []


class _Sink(io.RawIOBase):
    def __init__(self):
        super().__init__()
        self.buf = bytearray()

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.buf += bytes(b)
        return len(b)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


def split_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Top-level ISO-BMFF boxes of ``data`` as (type, bytes) (32-bit sizes only)."""
    out, i = [], 0
    while i + 8 <= len(data):
        size = struct.unpack_from(">I", data, i)[0]
        if size < 8:
            raise ValueError("unsupported box size")
        out.append((data[i + 4:i + 8], data[i:i + size]))
        i += size
    return out


class Fmp4Encoder:
    """H.264 (libx264, tune=zerolatency, no B-frames) in fragmented MP4, one fragment per frame.

    movflags ``frag_every_frame+empty_moov+default_base_moof``. FFmpeg's muxer closes a
    fragment when the next packet arrives, so each frame's fragment leaves one frame late;
    the encoder keeps the (index, action_seq) of every frame in flight and labels each
    fragment with the frame it really holds. Frames get consecutive timestamps in send
    order (dropped frames leave no gap in the MSE timeline; the header carries the stream
    index).
    """

    codec = "fmp4"

    def __init__(self, width: int, height: int, fps: int, gop: int | None = None, crf: int = 23):
        import av
        self.sink = _Sink()
        self.container = av.open(self.sink, mode="w", format="mp4",
                                 options={"movflags": "frag_every_frame+empty_moov+default_base_moof"})
        st = self.container.add_stream("libx264", rate=int(fps))
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.options = {"tune": "zerolatency", "preset": "ultrafast", "crf": str(crf)}
        st.codec_context.gop_size = gop or int(fps)
        self.stream = st
        self.pts = 0
        self.pending: list[tuple[int, int | None, int, int]] = []
        self._init_sent = False

    def header_messages(self) -> list[bytes]:
        return []

    def _drain(self) -> list[bytes]:
        data = self.sink.take()
        if not data:
            return []
        out, frag = [], b""
        for typ, box in split_boxes(data):
            if not self._init_sent and typ in (b"ftyp", b"moov"):
                if typ == b"moov":
                    init = frag + box
                    frag = b""
                    out.append(pack_header(KIND_INIT) + init)
                    self._init_sent = True
                else:
                    frag += box
                continue
            if typ == b"moof" and frag:
                out.append(self._label(frag))
                frag = b""
            frag += box
        if frag:
            out.append(self._label(frag))
        return out

    def _label(self, frag: bytes) -> bytes:
        index, seq, chunk, gen_ms = self.pending.pop(0) if self.pending else (0, None, 0, 0)
        key = FLAG_KEY if self._is_key(frag) else 0
        return pack_header(KIND_FRAGMENT, index, seq, chunk, gen_ms, key) + frag

    @staticmethod
    def _is_key(frag: bytes) -> bool:
        # trun first-sample flags / sample flags: sample_is_non_sync_sample bit (0x00010000)
        i = frag.find(b"trun")
        if i < 0:
            return False
        flags = int.from_bytes(frag[i + 5:i + 8], "big")
        pos = i + 8 + 4                       # after version/flags and sample_count
        if flags & 0x1:
            pos += 4
        if flags & 0x4:                       # first_sample_flags present
            return not (int.from_bytes(frag[pos:pos + 4], "big") & 0x00010000)
        if flags & 0x400:
            pos += 4 * bool(flags & 0x100) + 4 * bool(flags & 0x200)
            return not (int.from_bytes(frag[pos:pos + 4], "big") & 0x00010000)
        t = frag.find(b"tfhd")
        if t >= 0:
            tf = int.from_bytes(frag[t + 5:t + 8], "big")
            p = t + 8 + 4 + 8 * bool(tf & 0x1) + 4 * bool(tf & 0x2) + 4 * bool(tf & 0x8) + 4 * bool(tf & 0x10)
            if tf & 0x20:
                return not (int.from_bytes(frag[p:p + 4], "big") & 0x00010000)
        return False

    def encode(self, frame: np.ndarray, index: int, action_seq, chunk: int, gen_ms: int) -> list[bytes]:
        import av
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.pts
        self.pts += 1
        self.pending.append((index, action_seq, chunk, gen_ms))
        for pkt in self.stream.encode(vf):
            self.container.mux(pkt)
        return self._drain()

    def close(self) -> list[bytes]:
        """Flush the encoder and muxer (the last frame's fragment)."""
        try:
            for pkt in self.stream.encode():
                self.container.mux(pkt)
            self.container.close()
        except Exception:
            return []
        return self._drain()


def make_encoder(codec: str, width: int, height: int, fps: int, jpeg_quality: int = 85):
    if codec == "jpeg":
        return JpegEncoder(jpeg_quality)
    if codec == "fmp4":
        return Fmp4Encoder(width, height, fps)
    raise ValueError(f"unknown codec {codec!r}; use 'jpeg' or 'fmp4'")
