"""The loops over a split: one epoch of EP or BPTT training, the free-phase outputs and the
accuracy, the optimizer with one learning rate per synapse layer, and the check that no layer
of the network is dead (every unit on a flat part of σ)."""
import time

import torch
from tqdm import tqdm

from devices import Clock
from model_utils import DivergenceError, bptt_gradients, check_finite, ep_gradients, flat_units, relax


def make_optimizer(model, lrs, weight_decay=0.0):
    """Adam with one parameter group (and learning rate) per synapse layer. weight_decay > 0:
    AdamW, the decay decoupled from the gradient (each weight shrinks by lr·wd per step), on
    the weight matrices only (projections and FC weights; biases are not decayed), so each
    layer then has a weight group and a bias group with the same learning rate."""
    groups = model.layer_groups()
    if len(lrs) != len(groups):
        raise ValueError(f"--lrs needs {len(groups)} learning rates for this architecture "
                         f"({model.P} projection + {len(model.fc)} fully connected layers), "
                         f"got {len(lrs)}")
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())  # one kernel per tensor
    if not weight_decay:
        return torch.optim.Adam([{"params": g, "lr": lr, "layer": k} for k, (g, lr) in enumerate(zip(groups, lrs))],
                                eps=1e-8, fused=fused or None)
    split = []
    for k, (g, lr) in enumerate(zip(groups, lrs)):
        split.append({"params": g[:1], "lr": lr, "weight_decay": weight_decay, "layer": k})
        if len(g) > 1:
            split.append({"params": g[1:], "lr": lr, "weight_decay": 0.0, "layer": k})
    return torch.optim.AdamW(split, eps=1e-8, fused=fused or None)


def embed(embeddings, ids, dtype):
    """Token ids [B, L] or [B, 2, L] -> word vectors [..., L, D] on the embeddings' device."""
    return embeddings[ids.long()].to(dtype)


def drop_words(ids, p, generator):
    """Word dropout: each token id (0 = padding) is removed with probability p and the tokens
    left close up to the front, as dropped OOV tokens do in preprocessing (data_utils._pack).
    One mask over the whole global batch, drawn from the training generator, so a run is
    reproducible and every torchrun rank sees the same inputs as one process would."""
    ids = ids.masked_fill(torch.rand(ids.shape, generator=generator) < p, 0)
    order = torch.sort((ids == 0).to(torch.uint8), dim=-1, stable=True).indices
    return ids.gather(-1, order)


def batches(n, batch_size, generator=None):
    """Index batches over n samples, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_epoch(model, optimizer, split, embeddings, hp, generator, desc="train", dist=None):
    """One epoch of EP or BPTT training. hp: dict with alg, T, K, betas, estimator
    (`estimator_name`; EP only), batch_size, tol and optionally free_dtype, free_tf32, anderson,
    tol_nudged, sample_exit (see ep_gradients), warm (a fixed_point.WarmStarts over the split:
    read before and written after each free phase), bptt_checkpoint (see bptt_gradients) and
    word_dropout (a probability, `drop_words`). dist: a dist_utils.Dist
    to train data-parallel (each rank takes its part of every global batch).
    Returns dict(train_acc, samples, seconds, free_steps, nudged_steps, dead): dead lists
    the FC layers whose units were all flat for every sample of the epoch (`dead_layers`)."""
    device, dtype = embeddings.device, next(model.parameters()).dtype
    model.train()
    correct = seen = free = nudged = nb = 0
    active = [torch.zeros(h, dtype=torch.long, device=device) for h in model.fc_layers]
    start = time.perf_counter()
    bar = tqdm(batches(len(split), hp["batch_size"], generator), desc=desc, leave=False,
               dynamic_ncols=True)
    for batch in bar:
        idx = batch if dist is None else dist.shard(batch)
        ids = split.ids[batch]
        if hp.get("word_dropout"):  # drawn over the global batch, before the shard (drop_words)
            ids = drop_words(ids, hp["word_dropout"], generator)
        ids = ids if dist is None else dist.shard(ids)
        if len(idx):
            x = embed(embeddings, ids.to(device), dtype)
            y = split.labels[idx].to(device)
            if hp["alg"] == "EP":
                warm = hp.get("warm")
                out, info = ep_gradients(model, x, y, hp["T"], hp["K"], hp["betas"],
                                         hp["estimator"], hp.get("tol"),
                                         hp.get("free_dtype"),
                                         free_tf32=hp.get("free_tf32", False),
                                         anderson=hp.get("anderson") or 0, tol_nudged=hp.get("tol_nudged"),
                                         warm=None if warm is None else warm.get(idx, dtype),
                                         sample_exit=hp.get("sample_exit", False),
                                         bf16_matmul=hp.get("bf16_matmul", False))
                if warm is not None:
                    warm.put(idx, info["free_fc"])
            else:
                out, info = bptt_gradients(model, x, y, hp["T"], hp["K"], hp.get("bptt_checkpoint", 0),
                                           hp.get("free_tf32", False))
            correct += (out.argmax(1) == y).sum().item()
            free, nudged, nb = free + info["free_steps"], nudged + info["nudged_steps"], nb + 1
            active = [a + (~f) for a, f in zip(active, info["flat"])]
        if dist is not None:
            dist.average_grads(model, len(idx), len(batch))
        check_grads_finite(model)
        optimizer.step()
        seen += len(idx)
        bar.set_postfix(acc=f"{correct / max(seen, 1):.3f}", refresh=False)
    seconds = time.perf_counter() - start
    if dist is not None:
        correct, seen, free, nudged, nb = dist.sum([correct, seen, free, nudged, nb])
        active = [torch.tensor(dist.sum(a.tolist())) for a in active]
    dead = dead_layers([a == 0 for a in active]) if seen else []
    return {"train_acc": correct / max(seen, 1), "samples": int(seen), "seconds": seconds,
            "free_steps": free / max(nb, 1), "nudged_steps": nudged / max(nb, 1), "dead": dead}


@torch.no_grad()
def predict_outputs(model, ids, embeddings, T, batch_size, tol=None, desc=None, free_dtype=None,
                    stats=None, anderson=0, sample_exit=False):
    """Output layer after T free steps (β = 0) for every sample: [N, C]. free_dtype: run the
    steps in this dtype (e.g. torch.bfloat16) on copies of the weights. stats: a dict that
    receives the free steps used, averaged over the batches ("free_steps"). anderson,
    sample_exit: see relax."""
    device, dtype = embeddings.device, next(model.parameters()).dtype
    dt = free_dtype or dtype
    p = None if dt == dtype else [w.to(dt) for w in model.params()]
    model.eval()
    outs, used = [], []
    chunks = batches(len(ids), batch_size)
    for idx in tqdm(chunks, desc=desc, leave=False, disable=desc is None, dynamic_ncols=True):
        # merged keys: rows by their distinct keys, put back below
        (drive, keys), order = model.in_key_order(model.precompute(embed(embeddings, ids[idx].to(device), dtype)))
        s, n = relax(model, model.init_states(len(idx), device, dt), drive.to(dt), keys.to(dt), T,
                     tol=tol, p=p, anderson=anderson, sample_exit=sample_exit)
        check_finite(s, "evaluation free")
        outs.append((s[-1] if order is None else s[-1][torch.argsort(order)]).to(dtype).cpu())
        used.append(n)
    if stats is not None:
        stats["free_steps"] = sum(used) / max(len(used), 1)
    return torch.cat(outs) if outs else torch.zeros(0, model.n_classes)


def evaluate(model, split, embeddings, T, batch_size, tol=None, desc="eval", free_dtype=None, dist=None,
             stats=None, anderson=0, sample_exit=False):
    """Accuracy: argmax of the output after T free steps with β = 0. With dist, each rank
    evaluates its contiguous part of the split and the correct counts are summed. stats: see
    predict_outputs (this rank's batches)."""
    if len(split) == 0:
        return float("nan")
    idx = torch.arange(len(split)) if dist is None else dist.shard(torch.arange(len(split)))
    out = predict_outputs(model, split.ids[idx], embeddings, T, batch_size, tol, desc, free_dtype, stats,
                          anderson, sample_exit)
    correct = (out.argmax(1) == split.labels[idx]).sum().item()
    if dist is not None:
        correct = dist.sum([correct])[0]
    return correct / len(split)


def check_grads_finite(model):
    for name, prm in model.named_parameters():
        if prm.grad is not None and not torch.isfinite(prm.grad).all():
            raise DivergenceError(f"non-finite gradient for parameter {name}")


@torch.no_grad()
def seconds_per_step(model, x):
    """Wall time of one synchronous step of the dynamics on batch x (the second of two steps,
    so that one-time allocation is not counted): the unit of every time estimate."""
    drive, keys = model.precompute(x)
    s = model.step(model.init_states(x.shape[0], x.device, x.dtype), drive, keys)
    clock = Clock(x.device)
    model.step(s, drive, keys)
    return clock()


# ----------------------------------------------------------------------------- dead layers
class DeadNetworkError(RuntimeError):
    """A layer's units all sat on a flat part of σ: no nudge or gradient passes it."""


def dead_layers(flat):
    """Indices of the FC layers whose units are all flat (masks from `flat_units`)."""
    return [k for k, f in enumerate(flat) if bool(f.all())]


def dead_layer_message(model, dead, where, fix="Change --seed, lower --lrs, use --init centred "
                                                 "for new runs, or a smooth --act (my_sigmoid)"):
    """One line naming the dead FC layers (indices from `dead_layers`) and what to change."""
    names = ", ".join(f"fc.{k} ({'output' if k == len(model.fc) - 1 else 'hidden'}, "
                      f"{model.fc_layers[k]} units)" for k in dead)
    return (f"{names}: every unit sat on a flat part of {model.act_name} for every sample {where}, "
            f"so neither EP nor BPTT gets a gradient through it. {fix}")


@torch.no_grad()
def initial_dead_layers(model, x, T):
    """FC layers that are dead at the free state of batch x before any training."""
    drive, keys = model.precompute(x)
    s, _ = relax(model, model.init_states(x.shape[0], x.device, x.dtype), drive, keys, T)
    return dead_layers(flat_units(model, s))
