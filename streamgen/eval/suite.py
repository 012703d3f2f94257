"""The evaluation suite: drives any streaming generator through world action scripts and
measures it against the world's ground truth, exactly the same way for every generator.

Generator protocol (``streamgen.Pipeline`` satisfies it; so do the references below)::

    gen.config.fps, gen.config.height, gen.config.width
    s = gen.session(prompt: str, seed: int)
    s.step(action: dict | None) -> uint8 [T, H, W, 3]     # next T >= 1 frames, action applies to all
    s.set_prompt(text: str)

Each rollout records the action that was actually in force for every frame (``executed``);
the ground truth is the world replayed with exactly those actions, seed, prompts and switch
frame (so a chunked generator is compared with what its own actions should have shown).
All frames are centre-cropped and resized to 64x64 before measurement.

Metrics (each reported for the model and, measured identically, for ground truth):
  action_following  inverse-dynamics agreement with the commanded actions as the world carried
                    them out (keys whose move a wall blocked count as released; 0 chance,
                    1 perfect) on random-action rollouts; ``ratio`` = model / ground truth.
  world_fd          Fréchet distance of video-encoder features (8-frame windows, stride 4) of the
                    action and revisit rollouts vs their ground truth (paired: ground truth scores 0);
                    ``other_seeds`` = ground truth vs ground truth of other seeds, i.e. the FD
                    of showing plausible world video of the wrong scenes (a scale reference).
  revisit           360-degree turns and go/turn/come-back scripts; see metrics.revisit.
  drift             World-FD per time window of a long human-policy rollout.
  prompt_switch     theme-classifier response after a prompt switch; see metrics.switch_response.
  continuation      from the first true chunk of held-out exploring walks, PSNR/SSIM per chunk
                    against the true frames, next to copy-last, autoencoder and shuffled-action
                    references (``streamgen.eval.continuation``; Pipelines only).

``EvalSettings.start``: "noise" (sessions start from noise) or "world" (sessions open from the
world's own rendering of the look at the seed's spawn, ``session(start="world")``; the ground
truth is then replayed from the same opening frames).

Reference generators: ``GroundTruthGenerator`` (the world; the ceiling) and
``CorruptedGenerator("shuffled" | "frozen")`` (floors used to sanity-check the metrics).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from ..world.data import resize_frames
from ..world.episodes import TRANSITION, WorldSession, opening_frames, scene_for
from ..world.policies import FORWARD, act, free_run, human_policy, random_policy, revisit_script
from ..world.render import World
from ..world.scene import THEMES, Look, caption
from . import metrics as M
from .evaluators import EVAL_SIZE, Evaluators, effective_targets

OPENING = 3          # frames of a start="world" opening (one chunk of the shipped models)
ALL_METRICS = ("action", "fd", "revisit", "drift", "switch", "continuation")


@dataclass
class EvalSettings:
    rollouts: int = 4                 # rollouts per metric (action, revisit seeds, switch)
    rollout_frames: int = 96          # frames per action-following rollout
    drift_seconds: tuple = (20.0,)    # horizons; one rollout of the longest is windowed
    drift_window: float = 5.0         # seconds per drift FD window
    drift_rollouts: int = 2
    switch_pre: int = 32              # frames before / after the prompt switch
    switch_post: int = 48
    seed: int = 900000                # first world seed of the evaluation (training uses < 800000)
    metrics: tuple = field(default=ALL_METRICS)
    start: str = "noise"              # "noise" | "world": how model sessions open
    continuation_walks: int = 8
    continuation_chunks: int = 8


class GroundTruthGenerator:
    """The world itself behind the generator protocol."""

    name = "ground-truth"

    def __init__(self, size: int = EVAL_SIZE, fps: int = 16, chunk: int = 1):
        self.size, self.chunk = size, chunk
        self.config = SimpleNamespace(fps=fps, height=size, width=size)

    def session(self, prompt: str, seed: int, start=None) -> WorldSession:
        if start is None:
            return WorldSession(prompt, seed, self.size, self.chunk)
        if start != "world":
            raise ValueError("the ground-truth generator opens from noise-free spawn or start='world' only")
        _, ws = opening_frames(prompt, seed, OPENING, self.size)
        ws.chunk = self.chunk
        return ws


class _CorruptedSession:
    def __init__(self, inner: WorldSession, kind: str, seed: int):
        self.inner, self.kind = inner, kind
        self.rng = np.random.default_rng([seed, 5])
        self.history: list[np.ndarray] = []

    def set_prompt(self, text: str) -> None:
        self.inner.set_prompt(text)

    def step(self, action=None) -> np.ndarray:
        frames = self.inner.step(action)
        self.history += list(frames)
        if self.kind == "frozen":
            return np.stack([self.history[0]] * len(frames))
        return np.stack([self.history[self.rng.integers(len(self.history))] for _ in frames])


class CorruptedGenerator(GroundTruthGenerator):
    """Ground truth made wrong on purpose: ``frozen`` repeats the first frame forever,
    ``shuffled`` returns a random earlier frame of the true video at every step."""

    def __init__(self, kind: str, size: int = EVAL_SIZE, fps: int = 16, chunk: int = 1):
        if kind not in ("frozen", "shuffled"):
            raise ValueError(f"unknown corruption {kind!r}")
        super().__init__(size, fps, chunk)
        self.kind = self.name = kind

    def session(self, prompt: str, seed: int, start=None):
        return _CorruptedSession(super().session(prompt, seed, start), self.kind, seed)


# ----------------------------------------------------------------------------- rollouts
def _to_eval(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, 64, 64, 3]"""
    return resize_frames(torch.from_numpy(np.ascontiguousarray(frames)), EVAL_SIZE).numpy()


def _as_frames(out) -> np.ndarray:
    x = out.detach().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 1:
        raise ValueError(f"generator step must return uint8 [T, H, W, 3], got shape {x.shape}")
    return x.astype(np.uint8) if x.dtype != np.uint8 else x


class Rollouts:
    """Runs scripts on the model and replays them on the world; accumulates generation time."""

    def __init__(self, gen, start: str = "noise", tick=None):
        self.gen, self.gt = gen, GroundTruthGenerator(fps=int(getattr(gen.config, "fps", 16)))
        self.start, self.tick = start, tick
        self.gen_frames, self.gen_seconds = 0, 0.0

    def open(self, gen, prompt, seed):
        return gen.session(prompt, seed) if self.start == "noise" else gen.session(prompt, seed, start="world")

    def run(self, prompt, seed, script, switch_prompt=None, switch_at=None):
        """-> model frames [N,64,64,3], ground-truth frames [N,64,64,3], executed actions, switch frame."""
        sess = self.open(self.gen, prompt, seed)
        frames, executed, switched = [], [], None
        t0 = time.perf_counter()
        while len(executed) < len(script):
            i = len(executed)
            if switch_prompt is not None and switched is None and i >= switch_at:
                sess.set_prompt(switch_prompt)
                switched = i
            out = _as_frames(sess.step(script[i]))
            frames.append(out)
            executed += [script[i]] * out.shape[0]
        self.gen_seconds += time.perf_counter() - t0
        n = len(script)
        self.gen_frames += n
        gen = _to_eval(np.concatenate(frames)[:n])
        executed = executed[:n]
        if self.tick:
            self.tick(n)
        return gen, self.replay(prompt, seed, executed, switch_prompt, switched), executed, switched

    def replay(self, prompt, seed, executed, switch_prompt=None, switched=None) -> np.ndarray:
        s = self.open(self.gt, prompt, seed)
        out = []
        for i, a in enumerate(executed):
            if switch_prompt is not None and i == switched:
                s.set_prompt(switch_prompt)
            out.append(s.step(a))
        return np.concatenate(out)


def deconflict(actions) -> list[dict]:
    """Drop W+S and A+D conflicts (keep the first of each pair) so every command is visible."""
    out = []
    for a in actions:
        k = list(a["keys"])
        if "W" in k and "S" in k:
            k.remove("S")
        if "A" in k and "D" in k:
            k.remove("D")
        out.append(act(k, a["mouse"][0]))
    return out


def revisit_seeds(start: int, n: int) -> list[int]:
    """Seeds whose spawn has enough free run ahead for the go/turn/come-back script."""
    out, s = [], start
    while len(out) < n:
        w = World(s)
        if free_run(w, w.spawn) >= 24 * FORWARD + 0.3:
            out.append(s)
        s += 1
    return out


# ----------------------------------------------------------------------------- metrics
def _action_following(R, ev, S, feats) -> dict:
    gen_all, gt_all, ex_all = [], [], []
    for r in range(S.rollouts):
        seed = S.seed + r
        _, prompt = scene_for(seed)
        script = deconflict(random_policy(World(seed), np.random.default_rng([seed, 1]), S.rollout_frames))
        g, t, ex, _ = R.run(prompt, seed, script)
        gen_all.append(g)
        gt_all.append(t)
        ex_all.append(ex)
        feats["gen"].append(ev.encoder.features(g))
        feats["gt"].append(ev.encoder.features(t))
    # agreement over all consecutive pairs of all rollouts (pairs never straddle rollouts), with
    # the commanded actions as the world carried them out (a move into a wall shows no motion)
    targets = [effective_targets(World(S.seed + r).poses(ex)) for r, ex in enumerate(ex_all)]

    def agree(frames_list):
        pk, pt, tk, tt = [], [], [], []
        for f, (k, t) in zip(frames_list, targets):
            a, b = ev.idm.predict(f)
            pk.append(a), pt.append(b), tk.append(k), tt.append(t)
        return M.action_agreement(np.concatenate(pk), np.concatenate(pt), np.concatenate(tk), np.concatenate(tt))
    model, gt = agree(gen_all), agree(gt_all)
    ratio = model["score"] / gt["score"] if gt["score"] > 0 else float("nan")
    return {"model": model, "ground_truth": gt, "ratio": ratio}


def _revisit(R, ev, S, feats) -> dict:
    rows = []
    for i, seed in enumerate(revisit_seeds(S.seed + 100, S.rollouts)):
        _, prompt = scene_for(seed)
        for kind in ("turn", "back"):
            core = revisit_script(kind, 1.0 if i % 2 == 0 else -1.0) if kind == "turn" else revisit_script("back")
            script = [act()] * 12 + core + [act()] * 4
            first, ret = 11, 11 + len(core)
            g, t, _, _ = R.run(prompt, seed, script)
            feats["gen"].append(ev.encoder.features(g))
            feats["gt"].append(ev.encoder.features(t))
            rows.append({"seed": seed, "kind": kind, "first": first, "return": ret,
                         "model": M.revisit(g, t, first, ret), "ground_truth": M.revisit(t, t, first, ret)})
    mean = lambda who, k: float(np.mean([r[who][k] for r in rows]))  # noqa: E731
    return {"model": {"similarity": mean("model", "similarity"), "motion": mean("model", "motion")},
            "ground_truth": {"similarity": mean("ground_truth", "similarity"),
                             "motion": mean("ground_truth", "motion")},
            "rollouts": rows}


def _fd_floor(ev, S, gt_feats) -> float:
    """Ground truth vs ground truth of other seeds, with the same kinds of scripts."""
    R = Rollouts(GroundTruthGenerator())
    other = []
    for r in range(S.rollouts):
        seed = S.seed + 500 + r
        _, prompt = scene_for(seed)
        script = deconflict(random_policy(World(seed), np.random.default_rng([seed, 1]), S.rollout_frames))
        other.append(ev.encoder.features(R.replay(prompt, seed, script)))
    for i, seed in enumerate(revisit_seeds(S.seed + 600, S.rollouts)):
        _, prompt = scene_for(seed)
        for kind in ("turn", "back"):
            core = revisit_script(kind, 1.0 if i % 2 == 0 else -1.0) if kind == "turn" else revisit_script("back")
            other.append(ev.encoder.features(R.replay(prompt, seed, [act()] * 12 + core + [act()] * 4)))
    return M.frechet_distance(np.concatenate(gt_feats), np.concatenate(other))


def _drift(gen, ev, S, bar=None) -> dict:
    fps = int(getattr(gen.config, "fps", 16))
    n, win = int(round(max(S.drift_seconds) * fps)), max(int(round(S.drift_window * fps)), 8)
    n_win = max(n // win, 1)
    gen_w = [[] for _ in range(n_win)]
    gt_w = [[] for _ in range(n_win)]
    t0, made = time.perf_counter(), 0
    prog = bar(total=S.drift_rollouts * n_win * win, desc="drift frames", unit="frame") if bar else None
    for r in range(S.drift_rollouts):
        seed = S.seed + 300 + r
        _, prompt = scene_for(seed)
        w = World(seed)
        script = human_policy(w, np.random.default_rng([seed, 2]), n_win * win)
        sess = gen.session(prompt, seed) if S.start == "noise" else gen.session(prompt, seed, start="world")
        gts = GroundTruthGenerator().session(prompt, seed, None if S.start == "noise" else "world")
        buf_g, buf_t, k = [], [], 0
        while k < n_win * win:
            a = script[k]                          # in force for every frame of this step
            out = _as_frames(sess.step(a))
            made += out.shape[0]
            if prog is not None:
                prog.update(min(out.shape[0], n_win * win - k))
            for f in out[: n_win * win - k]:
                buf_g.append(f)
                buf_t.append(gts.step(a)[0])
                k += 1
                if k % win == 0:
                    gen_w[k // win - 1].append(ev.encoder.features(_to_eval(np.stack(buf_g)), stride=2))
                    gt_w[k // win - 1].append(ev.encoder.features(np.stack(buf_t), stride=2))
                    buf_g, buf_t = [], []
    if prog is not None:
        prog.close()
    curve = []
    for i in range(n_win):
        curve.append({"t0": i * win / fps, "t1": (i + 1) * win / fps,
                      "fd": M.frechet_distance(np.concatenate(gen_w[i]), np.concatenate(gt_w[i]))})
    at = {}
    for h in S.drift_seconds:
        ends = [c for c in curve if c["t1"] <= h + 1e-9]
        at[f"{h:g}"] = ends[-1]["fd"] if ends else None
    first, last = curve[0]["fd"], curve[-1]["fd"]
    return {"curve": curve, "at_seconds": at, "frames_per_rollout": n_win * win,
            "last_over_first": last / first if first > 0 else None,
            "gen_fps": made / max(time.perf_counter() - t0, 1e-9)}


def _prompt_switch(R, ev, S) -> dict:
    rows, curves = [], {"model": [], "ground_truth": []}
    for r in range(S.rollouts):
        seed = S.seed + 200 + r
        look, prompt = scene_for(seed)
        new = Look(THEMES[(look.theme_id + 1 + r) % len(THEMES)], look.time, look.weather)
        new_prompt = caption(new, np.random.default_rng([seed, 3]))
        script = human_policy(World(seed), np.random.default_rng([seed, 4]), S.switch_pre + S.switch_post)
        g, t, _, sw = R.run(prompt, seed, script, new_prompt, S.switch_pre)
        row = {"seed": seed, "from": look.theme, "to": new.theme, "switch_frame": sw}
        for who, frames in (("model", g), ("ground_truth", t)):
            p = ev.theme.probs(frames)
            row[who] = M.switch_response(p, sw, look.theme_id, new.theme_id, frames)
            curves[who].append(p[sw:, new.theme_id])
        rows.append(row)

    def agg(who):
        ks = [r[who]["frames_to_switch"] for r in rows]
        done = [k for k in ks if k is not None]
        return {"switched_fraction": len(done) / len(ks),
                "frames_to_switch": float(np.mean(done)) if done else None,
                "pre_accuracy": float(np.mean([r[who]["pre_accuracy"] for r in rows])),
                "post_accuracy": float(np.nanmean([r[who]["post_accuracy"] for r in rows])),
                "max_jump": float(np.mean([r[who]["max_jump"] for r in rows]))}
    return {"model": agg("model"), "ground_truth": agg("ground_truth"), "transition_frames": TRANSITION,
            "rollouts": rows, "p_new_curve": {k: np.mean(v, 0).tolist() for k, v in curves.items()}}


def run_suite(gen, settings: EvalSettings | None = None, evaluators: Evaluators | None = None,
              progress=None, bar=None) -> dict:
    """Run the selected metrics on ``gen``; returns the JSON-ready report dict.

    ``progress(msg)`` gets stage lines; ``bar(total=, desc=)`` (e.g. tqdm) makes progress bars."""
    S = settings or EvalSettings()
    bad = sorted(set(S.metrics) - set(ALL_METRICS))
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; known: {', '.join(ALL_METRICS)}")
    if S.start not in ("noise", "world"):
        raise ValueError(f"start must be 'noise' or 'world', got {S.start!r}")
    ev = evaluators or Evaluators.load()
    log = progress or (lambda msg: None)
    prog = bar(desc="rollout frames", unit="frame") if bar else None
    R = Rollouts(gen, S.start, tick=prog.update if prog is not None else None)
    feats = {"gen": [], "gt": []}
    res: dict = {}
    t0 = time.perf_counter()
    if "action" in S.metrics or "fd" in S.metrics:
        log("action following rollouts")
        res["action_following"] = _action_following(R, ev, S, feats)
    if "revisit" in S.metrics or "fd" in S.metrics:
        log("revisit rollouts")
        res["revisit"] = _revisit(R, ev, S, feats)
    if "fd" in S.metrics:
        log("world-fd")
        fd = M.frechet_distance(np.concatenate(feats["gen"]), np.concatenate(feats["gt"]))
        res["world_fd"] = {"model": fd, "ground_truth": 0.0, "other_seeds": _fd_floor(ev, S, feats["gt"]),
                           "windows": int(sum(len(f) for f in feats["gen"]))}
    if "drift" in S.metrics:
        log("drift rollout")
        res["drift"] = _drift(gen, ev, S, bar)
    if "switch" in S.metrics:
        log("prompt switch rollouts")
        res["prompt_switch"] = _prompt_switch(R, ev, S)
    if "continuation" in S.metrics:
        if hasattr(gen, "vae") and hasattr(gen.config, "sampler"):
            log("continuation walks")
            from .continuation import continuation
            res["continuation"] = continuation(gen, S.continuation_walks, S.continuation_chunks, S.seed,
                                               progress=bar)
        elif len(S.metrics) == 1:
            raise ValueError("the continuation metric needs a streamgen Pipeline (a model), not a reference")
    if prog is not None:
        prog.close()
    if "action" not in S.metrics:
        res.pop("action_following", None)       # rollouts were only needed for World-FD
    if "revisit" not in S.metrics:
        res.pop("revisit", None)
    cfg = gen.config
    return {"settings": {**asdict(S), "eval_size": EVAL_SIZE},
            "generator": {"fps": getattr(cfg, "fps", None), "height": getattr(cfg, "height", None),
                          "width": getattr(cfg, "width", None),
                          "gen_frames_per_second": R.gen_frames / R.gen_seconds if R.gen_seconds else None},
            "metrics": res, "evaluators": ev.info, "seconds": time.perf_counter() - t0}
