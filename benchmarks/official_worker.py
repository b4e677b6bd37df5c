"""The official WHAM code's side of benchmarks/bench_official.py, run by the official code's
own Python (its environment, not this project's): it imports the official classes from the
checkout named on its command line and answers one JSON command per line on stdin with one
JSON line on stdout. Nothing of the official code is copied here; this file only calls it.

    <official venv>/bin/python benchmarks/official_worker.py --official-repo <checkout>

Commands:
    {"cmd": "build", "path": P, "seed": S}   random weights in the official classes (the 200M
                                             transformer over the 300x180 ViT-VQGAN layout),
                                             saved as a Lightning checkpoint at P
    {"cmd": "load", "path": P, "threads": N} the official checkpoint loader
    {"cmd": "predict", "context": C, "out": O}
        C: .npz with `image_tokens` [B, T, 540] and `actions` [B, T, 16] (buttons 0/1, stick
        bins 0..10); the official predictor's `predict_next_step` (greedy), timed; O: .npz
        with the predicted `image_tokens` [B, 540] and `actions` [B, 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

# A checkpoint holds pickled objects of the official classes; its loader needs the full
# unpickler (this process only ever loads the checkpoint it built itself).
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

GPT_SIZE = "chinchilla-251M"
CONTEXT_STEPS = 10  # the model's window: block size = 10 steps of 556 tokens
IMAGE = {"image_size_per_x_axis": 300, "image_size_per_y_axis": 180, "patch_size": 10,
         "vocab_size": 16384}
# The tokenizer is never timed: a small ViT keeps the file and the build small.
VIT = {"transf_dim": 64, "embedding_dim": 32, "num_layers": 1, "head_size": 32,
       "commitment_cost": 0.25, "is_perceptual": True}


def _official(repo: str):
    """The official modules (imported from the checkout; their prints go to stderr)."""
    sys.path.insert(0, repo)
    with contextlib.redirect_stdout(sys.stderr):
        import numpy as np
        import pytorch_lightning as pl
        import torch
        from tensordict import TensorDict
        from wham.models.vqgan.vqgan import VQGANModel
        from wham.models.wham_base.pl_creation_args import LightningModuleCreationArgs
        from wham.models.wham_token_model.gpt_token_transformer_predictor import (
            GPTTokenPredictor,
        )
        from wham.models.wham_token_model.token_action_encoder import ActionTokenEncoder
        from wham.models.wham_token_model.wham_token import WHAMTokenModule
        from wham.utils import load_model_from_checkpoint
    return argparse.Namespace(
        np=np, pl=pl, torch=torch, TensorDict=TensorDict, VQGANModel=VQGANModel,
        LightningModuleCreationArgs=LightningModuleCreationArgs,
        GPTTokenPredictor=GPTTokenPredictor, ActionTokenEncoder=ActionTokenEncoder,
        WHAMTokenModule=WHAMTokenModule, load_model_from_checkpoint=load_model_from_checkpoint)


def build(o, path: str, seed: int) -> dict:
    o.torch.manual_seed(seed)
    args = o.LightningModuleCreationArgs
    model_spec = {"model_size": GPT_SIZE, "seq_len": CONTEXT_STEPS}
    module = o.WHAMTokenModule(
        predictor_args=args(pl_class=o.GPTTokenPredictor, model_spec=model_spec),
        context_encoder_args={
            "images": args(pl_class=o.VQGANModel, model_spec={**IMAGE, **VIT}),
            "actions_output": args(pl_class=o.ActionTokenEncoder),
        },
        variant={"model_spec": model_spec})
    o.torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": o.pl.__version__, "epoch": 0, "global_step": 0},
                 path)
    return {"bytes": os.path.getsize(path),
            "tokens_per_image": int(module.predictor.tokens_per_modality["images"])}


def predict(o, module, context: str, out: str) -> dict:
    data = o.np.load(context)
    torch = o.torch
    actions = module.context_encoders["actions_output"]
    with torch.no_grad():
        world = torch.from_numpy(data["actions"]).float()  # [B, T, 16]
        tokens = o.TensorDict({"images": torch.from_numpy(data["image_tokens"]).long(),
                               "actions_output": actions._encode(world)},
                              batch_size=world.shape[:2])
        t0, cpu0 = time.perf_counter(), time.process_time()
        predicted, _ = module.predictor.predict_next_step(tokens, deterministic=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        predicted_actions = actions._decode(predicted["actions_output"])  # [B, 1, 16]
    o.np.savez(out, image_tokens=predicted["images"][:, 0].numpy(),
               actions=predicted_actions[:, 0].round().long().numpy())
    return {"seconds": seconds, "cpu_seconds": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True)
    args = parser.parse_args()
    replies = sys.stdout
    sys.stdout = sys.stderr  # the official code prints; only replies go to the real stdout
    o = _official(args.official_repo)
    module = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "build":
                reply = build(o, command["path"], command["seed"])
            elif command["cmd"] == "load":
                o.torch.set_num_threads(command["threads"])
                module = o.load_model_from_checkpoint(command["path"]).eval()
                reply = {"threads": o.torch.get_num_threads(), "torch": o.torch.__version__}
            elif command["cmd"] == "predict":
                reply = predict(o, module, command["context"], command["out"])
            else:
                reply = {"error": f"unknown command {command['cmd']!r}"}
        except Exception as exc:  # the parent reports it and stops
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
