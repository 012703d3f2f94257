"""python scripts/continuation_ckpt.py --model FOLDER [--ckpt runs/.../ckpt/step-N.pt] [--walks 8]

The continuation metric of a release folder, optionally with a training checkpoint's EMA weights
loaded into its model (same architecture), on one thread. Prints one JSON line: chunk 1 and mean
PSNR minus copy-last, the shuffled-actions cost, per-chunk PSNR. For watching a stage's curve
without exporting every checkpoint.
"""
import argparse
import json

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="release folder (or shipped name) whose config and autoencoder to use")
    p.add_argument("--ckpt", default=None, help="training checkpoint whose EMA weights to load")
    p.add_argument("--walks", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    from streamgen import Pipeline
    from streamgen.eval.continuation import continuation
    from streamgen.training.export import load_ema
    pipe = Pipeline.from_pretrained(a.model)
    if a.ckpt:
        load_ema(pipe, a.ckpt)
    r = continuation(pipe, walks=a.walks)
    print(json.dumps({"model": a.model, "ckpt": a.ckpt, **r["model_minus_copy_last_db"],
                      "shuffled_cost_db": r["action_sensitivity_db"], "psnr": r["model"]["psnr"],
                      "copy_last_mean": r["copy_last"]["psnr_mean"], "autoencoder_mean": r["autoencoder"]["psnr_mean"]}))


if __name__ == "__main__":
    main()
