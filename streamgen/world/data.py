"""Training data on disk: world shards, their streaming loader, and a loader for MP4 folders.

Shard layout (``write_dataset``), one directory::

    index.json                  {"format": "streamgen-world", "version": 1, "clips": N,
                                 "clip_frames": T, "size": S, "fps": 16, "action_keys": [...],
                                 "action_dim": 6, "pose": ["x", "y", "yaw"], "seed": ..., "policy": ...,
                                 "shards": [{"name": "shard-00000", "clips": n, "kind": "npz"|"npy"}]}
    shard-00000.npz             compress="zip": one zip with frames/actions/pose/captions
    shard-00000.frames.npy ...  compress="none": one .npy per field (memory-mapped when read)

Fields per shard: ``frames`` uint8 [n, T, S, S, 3], ``actions`` float32 [n, T, 6]
(``streamgen.io.actions.encode_action`` over W, A, S, D, dx, dy), ``pose`` float32 [n, T, 3]
(x, y, yaw), ``captions`` unicode [n], ``seeds`` int64 [n]. Clip ``i`` of a dataset written
with ``--seed s`` uses world seed ``s + i`` (the evaluation suite uses seeds >= 900000).
Everything is read with ``allow_pickle=False``.

Loaders yield ``{"frames": uint8 [T,H,W,3], "actions": float32 [T,6], "pose": float32 [T,3],
"caption": str}`` as torch tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from ..errors import StreamgenError
from .episodes import ACTION_SPACE, generate_clip

FORMAT = "streamgen-world"


class DataError(StreamgenError, ValueError):
    """A dataset folder, shard or video is missing or malformed."""


# ----------------------------------------------------------------------------- video files
def write_mp4(path: str, frames: np.ndarray, fps: int = 16, crf: int = 18) -> None:
    """uint8 [N, H, W, 3] -> H.264 MP4 (libx264, yuv420p). H and W must be even."""
    import av

    frames = np.ascontiguousarray(frames)
    n, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as out:
        st = out.add_stream("libx264", rate=int(fps))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": str(crf), "preset": "veryfast"}
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def read_mp4(path: str) -> np.ndarray:
    """Any video PyAV can decode -> uint8 [N, H, W, 3]."""
    import av

    try:
        with av.open(str(path)) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"cannot decode video {path}: {e}") from None
    if not frames:
        raise DataError(f"video {path} has no frames")
    return np.stack(frames)


def resize_frames(frames: torch.Tensor, size) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3]; an int size centre-crops to a square first."""
    if size is None:
        return frames
    t, h, w, _ = frames.shape
    if isinstance(size, int):
        s = min(h, w)
        frames = frames[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        size = (size, size)
    if tuple(frames.shape[1:3]) == tuple(size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()                                # [T, 3, H, W]
    mode = "area" if size[0] <= x.shape[2] else "bilinear"
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode=mode)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- writer
def write_dataset(out: str, clips: int, frames: int = 32, size: int = 64, seed: int = 0,
                  policy: str = "mixed", clips_per_shard: int = 64, compress: str = "zip",
                  progress: str = "bar") -> dict:
    """Render ``clips`` world clips into shards under ``out``; returns the index dict."""
    if clips <= 0 or frames <= 0 or clips_per_shard <= 0:
        raise DataError("clips, frames and clips-per-shard must be > 0")
    if compress not in ("zip", "none"):
        raise DataError(f"compress must be 'zip' or 'none', got {compress!r}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": 1, "clips": 0, "clip_frames": frames, "size": size, "fps": 16,
             "action_keys": list(ACTION_SPACE.keys), "action_dim": ACTION_SPACE.dim,
             "pose": ["x", "y", "yaw"], "seed": seed, "policy": policy, "shards": []}
    bar = tqdm(total=clips, desc="world clips", unit="clip", disable=progress != "bar")
    for s0 in range(0, clips, clips_per_shard):
        batch = [generate_clip(seed + i, frames, size, policy) for i in range(s0, min(clips, s0 + clips_per_shard))]
        arrays = {"frames": np.stack([c["frames"] for c in batch]),
                  "actions": np.stack([c["actions"] for c in batch]),
                  "pose": np.stack([c["pose"] for c in batch]),
                  "captions": np.array([c["caption"] for c in batch]),
                  "seeds": np.array([c["seed"] for c in batch], np.int64)}
        name = f"shard-{len(index['shards']):05d}"
        if compress == "zip":
            tmp = root / f"{name}.tmp.npz"
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, root / f"{name}.npz")
        else:
            for k, v in arrays.items():
                np.save(root / f"{name}.{k}.npy", v)
        index["shards"].append({"name": name, "clips": len(batch), "kind": "npz" if compress == "zip" else "npy"})
        index["clips"] += len(batch)
        bar.update(len(batch))
    bar.close()
    (root / "index.json").write_text(json.dumps(index, indent=1))
    return index


# ----------------------------------------------------------------------------- loaders
def _split() -> tuple[int, int]:
    """(this reader's slot, number of slots) over distributed ranks x dataloader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class ClipDataset(IterableDataset):
    """Streams clips from a shard folder.

    ``start`` skips the first ``start`` clips of the (possibly shuffled) order, so training
    resumes with ``ClipDataset(root, start=consumed)``; ``self.yielded`` counts the clips this
    process yielded (with DataLoader workers, count in the training loop instead).
    ``shuffle``: "none" (written order) or "shards" (shard order and clips within a shard
    permuted from ``seed`` + ``epoch``). Clips are divided round-robin over distributed ranks
    and DataLoader workers. ``clip_frames`` takes the first T frames; ``size`` resizes.
    """

    def __init__(self, root: str, clip_frames: int | None = None, size=None, start: int = 0,
                 shuffle: str = "none", seed: int = 0, epoch: int = 0):
        super().__init__()
        self.root = Path(root)
        try:
            self.index = json.loads((self.root / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{root} is not a streamgen world dataset (index.json: {e})") from None
        if self.index.get("format") != FORMAT:
            raise DataError(f"{root}/index.json is not a {FORMAT} index")
        if clip_frames is not None and not 0 < clip_frames <= self.index["clip_frames"]:
            raise DataError(f"clip_frames must be in 1..{self.index['clip_frames']}")
        if shuffle not in ("none", "shards"):
            raise DataError(f"shuffle must be 'none' or 'shards', got {shuffle!r}")
        self.clip_frames, self.size, self.start = clip_frames, size, int(start)
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.yielded = 0

    def __len__(self) -> int:
        return max(0, self.index["clips"] - self.start)

    def order(self) -> list[tuple[int, int]]:
        """Global clip order as (shard number, clip within shard)."""
        shards = list(range(len(self.index["shards"])))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle == "shards":
            shards = list(rng.permutation(shards))
        out = []
        for s in shards:
            n = self.index["shards"][s]["clips"]
            clips = rng.permutation(n) if self.shuffle == "shards" else range(n)
            out += [(int(s), int(c)) for c in clips]
        return out

    def _load(self, s: int) -> dict:
        sh = self.index["shards"][s]
        try:
            if sh["kind"] == "npz":
                with np.load(self.root / f"{sh['name']}.npz", allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            return {k: np.load(self.root / f"{sh['name']}.{k}.npy", mmap_mode="r", allow_pickle=False)
                    for k in ("frames", "actions", "pose", "captions")}
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read shard {sh['name']} in {self.root}: {e}") from None

    def __iter__(self):
        slot, slots = _split()
        todo = [o for i, o in enumerate(self.order()) if i >= self.start and (i - self.start) % slots == slot]
        cache: tuple[int, dict] | None = None
        for s, c in todo:
            if cache is None or cache[0] != s:
                cache = (s, self._load(s))
            d = cache[1]
            t = self.clip_frames or d["frames"].shape[1]
            frames = resize_frames(torch.from_numpy(np.array(d["frames"][c, :t])), self.size)
            self.yielded += 1
            yield {"frames": frames, "actions": torch.from_numpy(np.array(d["actions"][c, :t], np.float32)),
                   "pose": torch.from_numpy(np.array(d["pose"][c, :t], np.float32)),
                   "caption": str(d["captions"][c])}


class VideoFolderDataset(IterableDataset):
    """Ordinary videos + captions: JSONL lines ``{"file": "a.mp4", "caption": "..."}``.

    Each video (path relative to ``folder``) is decoded with PyAV, cut into consecutive
    non-overlapping clips of ``clip_frames`` (a shorter tail is dropped) and resized to
    ``size`` (int: centre square crop). Actions and poses are zeros (no controls known).
    ``start`` skips clips as in :class:`ClipDataset`; splitting over ranks/workers is by video.
    """

    def __init__(self, folder: str, captions_jsonl: str | None = None, clip_frames: int = 16, size=64,
                 start: int = 0):
        super().__init__()
        self.folder = Path(folder)
        path = Path(captions_jsonl) if captions_jsonl else self.folder / "captions.jsonl"
        if clip_frames <= 0:
            raise DataError("clip_frames must be > 0")
        self.items: list[tuple[Path, str]] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"cannot read captions file {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                name, cap = obj.get("file", obj.get("video")), obj["caption"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise DataError(f"{path}:{n}: expected {{\"file\": ..., \"caption\": ...}}") from None
            if not isinstance(name, str) or not isinstance(cap, str):
                raise DataError(f"{path}:{n}: 'file' and 'caption' must be strings")
            if not (self.folder / name).is_file():
                raise DataError(f"{path}:{n}: video {name} not found in {self.folder}")
            self.items.append((self.folder / name, cap))
        self.clip_frames, self.size, self.start, self.yielded = clip_frames, size, int(start), 0

    def __iter__(self):
        slot, slots = _split()
        k = 0
        dim = ACTION_SPACE.dim
        for i, (path, cap) in enumerate(self.items):
            if i % slots != slot:
                continue
            frames = torch.from_numpy(read_mp4(str(path)))
            for s in range(0, frames.shape[0] - self.clip_frames + 1, self.clip_frames):
                k += 1
                if k <= self.start:
                    continue
                clip = resize_frames(frames[s:s + self.clip_frames], self.size)
                t = clip.shape[0]
                self.yielded += 1
                yield {"frames": clip, "actions": torch.zeros(t, dim), "pose": torch.zeros(t, 3),
                       "caption": cap}
