"""How exact is the EP estimate in float32, and with TF32? Measured against float64.

    python tools/ep_precision.py saved_models/test_SNLI_25_300 --batch 16

Takes a run folder (its weights, hyperparameters and embeddings.npz), draws a batch of token
ids from the 3,000 most frequent words (seeded), computes the 3-phase EP gradient in float64
and, in float32, with: no TF32; TF32 in the free phase only (the CUDA default of main.py);
TF32 everywhere. TF32 is emulated on any device by rounding the operands of every matmul to
TF32's 10-bit mantissa, so the table can be made without a GPU. Prints the relative error
‖g − g64‖/‖g64‖ of every parameter.
"""
import argparse
import contextlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model_utils as mu  # noqa: E402
import ops  # noqa: E402
import registry  # noqa: E402


def to_tf32(x):
    """Round float32 to TF32's 10-bit mantissa (to nearest, ties away from zero)."""
    if x.dtype != torch.float32:
        return x
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


@contextlib.contextmanager
def emulated_tf32(enabled):
    """Every matmul (@, F.linear, einsum) on TF32-rounded operands inside the block."""
    if not enabled:
        yield
        return
    mm, lin, ein = torch.Tensor.__matmul__, torch.nn.functional.linear, torch.einsum
    onednn = set(ops.ONEDNN_DTYPES)
    torch.Tensor.__matmul__ = lambda a, b: mm(to_tf32(a), to_tf32(b))
    torch.nn.functional.linear = lambda x, w, b=None: lin(to_tf32(x), to_tf32(w), b)
    torch.einsum = lambda eq, *ops: ein(eq, *[to_tf32(o) for o in ops])
    ops.ONEDNN_DTYPES.clear()  # route ops.linear through F.linear
    try:
        yield
    finally:
        torch.Tensor.__matmul__, torch.nn.functional.linear, torch.einsum = mm, lin, ein
        ops.ONEDNN_DTYPES.update(onednn)


def ep_gradient(ckpt, x, y, dtype, tf32):
    cfg, h = ckpt["config"]["model"], ckpt["config"]["hyper"]
    model = mu.build_model(cfg)
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model = model.to(dtype)
    args = (model, x.to(dtype), y, h["T"], h["K"], tuple(h["betas"]), True)
    if tf32 == "free":  # main.py's CUDA policy: only the free phase in TF32
        real, mu.cuda_tf32 = mu.cuda_tf32, emulated_tf32  # the name ep_gradients calls
        try:
            mu.ep_gradients(*args, free_tf32=True)
        finally:
            mu.cuda_tf32 = real
    else:
        with emulated_tf32(tf32 == "all"):
            mu.ep_gradients(*args)
    return model.param_names(), [p.grad.double() for p in model.params()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder with best_model.pt and embeddings.npz")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ckpt = torch.load(os.path.join(args.run, "best_model.pt"), map_location="cpu", weights_only=True)
    with np.load(os.path.join(args.run, "embeddings.npz"), allow_pickle=False) as f:
        vectors = torch.from_numpy(f["vectors"]).float()
    vectors = torch.cat([torch.zeros(1, vectors.shape[1]), vectors])
    cfg = ckpt["config"]["model"]
    g = torch.Generator().manual_seed(args.seed)
    n = registry.get(cfg["dataset"]).n_fields
    shape = (args.batch, cfg["seq_len"]) if n == 1 else (args.batch, n, cfg["seq_len"])
    x = vectors[torch.randint(1, min(len(vectors), 3000), shape, generator=g)]
    y = torch.randint(0, cfg["fc_layers"][-1], (args.batch,), generator=g)
    names, ref = ep_gradient(ckpt, x, y, torch.float64, "none")
    print("float32 EP gradient vs float64, relative error per parameter")
    for mode, label in [("none", "float32"), ("free", "TF32 free phase"), ("all", "TF32 everywhere")]:
        _, got = ep_gradient(ckpt, x, y, torch.float32, mode)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        print(f"{label:16s} max {max(errs):.1e}  " + "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
