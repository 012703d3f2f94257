"""A deliberately plain reference cache: per-frame dicts and concatenation.

It keeps [sink frames | anchor | frames of the last W up to the chunk end] by building a
new tensor every call, computes RoPE positions the obvious way, and applies the EMA sink by
blending evicted frames in frame order. It duck-types the parts of StreamCache the model uses
(cfg, cross_kv, q_pos, k_pos, key_valid, write), so the same model runs against both.
"""
import torch


class NaiveCache:
    def __init__(self, cfg, num_layers, T):
        self.cfg, self.T = cfg, T
        self.S, self.W = cfg.sink_frames, cfg.ring_frames
        self.frames = [dict() for _ in range(num_layers)]      # layer -> {frame: (k, v)}
        self.sink = [dict() for _ in range(num_layers)]        # EMA sink: layer -> {i: (k, v)}
        self.cross_kv = None
        self.next_frame = 0

    def begin_chunk(self, n):
        self.begin_frames(list(range(self.next_frame, self.next_frame + n)))
        self.next_frame += n

    def begin_frames(self, frames):
        end = max(frames) + 1
        self.chunk = frames
        if self.cfg.sink == "ema":
            for layer in range(len(self.frames)):
                d = self.frames[layer]
                for e in sorted(d):
                    if e >= self.S and e < end - self.W:
                        k, v = d.pop(e)
                        sk, sv = self.sink[layer][e % self.S]
                        a = self.cfg.ema_alpha
                        self.sink[layer][e % self.S] = (a * sk + (1 - a) * k, a * sv + (1 - a) * v)
        have = set(self.frames[0]) | set(self.sink[0]) | set(frames)
        self.window = [f for f in range(max(self.S, end - self.W), end) if f in have]
        self.sink_ids = [f for f in range(min(self.S, end)) if f in have]
        order = self.sink_ids + [f for f in self.window if f not in self.sink_ids]
        self.order = order
        if self.cfg.rope == "absolute":
            qpos = frames
            kpos = order
        else:
            first = max(self.S, end - self.W)
            pos = {f: (f if f < self.S else self.S + f - first) for f in order}
            qpos, kpos = [pos[f] for f in frames], [pos[f] for f in order]
        self.q_pos = torch.tensor([qpos])
        self.k_pos = torch.tensor([kpos])
        self.key_valid = torch.ones(1, len(order) * self.T, dtype=torch.bool)

    def write(self, layer, k, v):
        T = self.T
        for i, f in enumerate(self.chunk):
            kf, vf = k[:, i * T:(i + 1) * T], v[:, i * T:(i + 1) * T]
            if self.cfg.sink == "ema" and f < self.S:
                self.sink[layer][f] = (kf, vf)
            else:
                self.frames[layer][f] = (kf, vf)
        ks, vs = [], []
        for f in self.order:
            if self.cfg.sink == "ema" and f < self.S:
                kf, vf = self.sink[layer][f]
            else:
                kf, vf = self.frames[layer][f]
            ks.append(kf)
            vs.append(vf)
        return torch.cat(ks, 1), torch.cat(vs, 1)
