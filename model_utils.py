"""Convergent RNNs with modern-Hopfield projection layers, trained by Equilibrium Propagation.

Everything follows from one scalar, the primitive function Φ (docs/method.md §1). This module holds
the model (IMDB: one projection layer; SNLI: four parallel ones) with Φ,
its closed-form state gradients and the Hebbian parameter gradients, the synchronous
dynamics, the 2- and 3-phase EP update, the BPTT baseline, and the train / evaluate loops.
The activations and the matmul kernel are in `ops`, the fixed-point solvers in `fixed_point`.

Conventions: a state is a list `s` of tensors; `s[0]` is the stack of projection states
[B, P, L, D] (P = 1 for IMDB, 4 for SNLI), `s[1:]` are the fully connected layers [B, H_k],
`s[-1]` the output. Parameters are, in order, the P projection matrices [D, D] and the
(weight, bias) of each fully connected layer; `model.params()` returns them as a list `p`
and every function below accepts such a list so that checks can pass per-step copies.
"""
import contextlib
import copy
import math
import os
import time

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fixed_point
import registry
from fixed_point import relative_change  # noqa: F401  (the tool's one convergence measure)
from ops import (ACTIVATION_CENTRE, ACTIVATION_DELTAS, ACTIVATION_FLAT, ACTIVATIONS, INITS,  # noqa: F401
                 ONEDNN_DTYPES, bf16_notice, hard_sigmoid, linear, my_hard_sig, my_sigmoid, softmax_delta)


DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the model dtypes a user can choose


def pick_device(index=None, log=print):
    """cuda:index where CUDA is available (index None: 0); otherwise the CPU, with a notice
    when a CUDA index was asked for. ValueError for an index this machine does not have."""
    if torch.cuda.is_available():
        index = 0 if index is None else index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"--device {index}: only {torch.cuda.device_count()} CUDA device(s) found")
        return torch.device(f"cuda:{index}")
    if index is not None:
        log(f"notice: CUDA is not available, running on CPU (--device {index} ignored)")
    return torch.device("cpu")


class DivergenceError(RuntimeError):
    """A state, output or gradient became NaN/Inf."""


# ----------------------------------------------------------------------------- the model
class EPNet(nn.Module):
    """Convergent RNN: P parallel Hopfield projection layers followed by an FC stack (docs/method.md §1)."""

    def __init__(self, dataset, seq_len, embed_dim, fc_layers, act="my_hard_sig", gamma=None,
                 init="centred"):
        super().__init__()
        spec = registry.get(dataset)  # its inputs, projection pairs and γ (registry.py)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
        self.dataset, self.L, self.D = spec.name, int(seq_len), int(embed_dim)
        self.fc_layers, self.act_name = [int(h) for h in fc_layers], act
        self.act, self.act_delta = ACTIVATIONS[act], ACTIVATION_DELTAS[act]
        self.pairs, self.n_inputs = [tuple(q) for q in spec.projections], spec.n_fields
        self.P = len(self.pairs)
        if gamma is None:
            gamma = spec.gamma or 1.0 / math.sqrt(self.D)
        self.gamma = float(gamma)
        self.compiled = {}  # method name -> its torch.compile'd version (compile_step())
        self.proj = nn.ParameterList(
            [nn.Parameter(torch.empty(self.D, self.D)) for _ in self.pairs])
        sizes = [self.P * self.L * self.D] + self.fc_layers
        self.fc = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        for w in self.proj:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # same law as nn.Linear
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
        if init == "centred":
            self.centre_biases()

    def centre_biases(self):
        """Shift the output layer's biases by the centre of σ's working range (my_hard_sig: 1,
        i.e. σ = ½), keeping nn.Linear's ±1/√fan_in spread. With nn.Linear's zero-centred
        biases a hard sigmoid starts about half of its units on the flat part at 0, and at
        times the whole output layer, which then passes neither nudge nor gradient (a dead
        network at 50 %). Hidden layers keep nn.Linear's biases: centring them too puts every
        hidden unit at ½, and the common-mode input that gives the output layer stalled
        learning on IMDB (docs/precision.md)."""
        with torch.no_grad():
            self.fc[-1].bias.add_(ACTIVATION_CENTRE[self.act_name])

    @property
    def n_classes(self):
        return self.fc_layers[-1]

    @property
    def n_synapse_layers(self):
        return self.P + len(self.fc)

    def config(self):
        """The JSON-able architecture, enough to rebuild the model."""
        return {"dataset": self.dataset, "seq_len": self.L, "embed_dim": self.D,
                "fc_layers": self.fc_layers, "act": self.act_name, "gamma": self.gamma}

    def params(self):
        """Parameters as a flat list p: [W_proj_1..P, W_fc1, b_fc1, W_fc2, b_fc2, ...]."""
        return list(self.parameters())

    def param_names(self):
        return [n for n, _ in self.named_parameters()]

    def layer_groups(self):
        """One list of parameters per synapse layer (projections first), for per-layer lrs."""
        return [[w] for w in self.proj] + [[l.weight, l.bias] for l in self.fc]

    def _split(self, p):
        p = self.params() if p is None else p
        return p[:self.P], p[self.P::2], p[self.P + 1::2]  # projections, FC weights, FC biases

    # -- input-only terms, once per batch ----------------------------------------------
    def inputs(self, x):
        """x: [B, L, D] (one input field, IMDB) or [B, F, L, D] (SNLI: premise, hypothesis)
        -> list of F input sequences [B, L, D], the fields of the dataset's registry entry."""
        return [x] if self.n_inputs == 1 else list(x.unbind(1))

    def precompute(self, x, p=None):
        """Bottom-up drive x·Wᵀ [B, P, L, D] and the attended keys/values [B, P, L, D]."""
        proj, _, _ = self._split(p)
        xs = self.inputs(x)
        drive = torch.stack([xs[q] @ w.t() for (q, _), w in zip(self.pairs, proj)], 1)
        keys = torch.stack([xs[k] for _, k in self.pairs], 1)
        return drive, keys

    def init_states(self, batch_size, device=None, dtype=None):
        """All layers at zero: [B, P, L, D] then [B, H_k] for each FC layer."""
        kw = {"device": device, "dtype": dtype}
        return [torch.zeros(batch_size, self.P, self.L, self.D, **kw)] + \
               [torch.zeros(batch_size, h, **kw) for h in self.fc_layers]

    def warm_states(self, fc, drive, keys, p=None):
        """A starting point from the fully connected states alone (a warm start,
        `fixed_point.WarmStarts`): the projection states are what the step makes of s[1],
        softmax(γ·(drive + W₁ᵀ s[1])·keysᵀ)·keys, the value they take at any fixed point."""
        return [self.retrieve(self._grad_projection(fc[0], drive, p), keys)] + list(fc)

    # -- Φ and its gradients ----------------------------------------------------------
    def phi(self, x, s, beta=0.0, y=None, p=None):
        """Primitive function Φ(x, s, θ; β, y) per sample, shape [B] (docs/method.md §1)."""
        _, W, b = self._split(p)
        drive, _ = self.precompute(x, p)
        out = (s[0] * drive).flatten(1).sum(1)
        for k in range(len(W)):
            out = out + (s[k + 1] * F.linear(s[k].flatten(1), W[k], b[k])).sum(1)
        if beta != 0.0:
            out = out - beta * 0.5 * ((s[-1] - one_hot(y, s[-1])) ** 2).sum(1)
        return out

    def grad_states(self, s, drive, beta=0.0, y=None, p=None):
        """Closed-form ∂Φ/∂s_k for every layer (docs/method.md §1, 'one step of the dynamics')."""
        return [self._grad_projection(s[1], drive, p)] + self._grad_fc(s, beta, y, p)

    def _grad_projection(self, s1, drive, p=None):
        """∂Φ/∂s[0]: the bottom-up drive plus the top-down feedback W₁ᵀ s[1]."""
        W = self._split(p)[1]
        return linear(s1, W[0].t(), add=drive.flatten(1)).view_as(drive)

    def _grad_fc(self, s, beta=0.0, y=None, p=None):
        """∂Φ/∂s_k of the FC layers k ≥ 1, from the layers below and above (and the nudge)."""
        _, W, b = self._split(p)
        nudge = (lambda g: g + beta * (one_hot(y, s[-1]) - s[-1])) if beta != 0.0 else None
        return [self._fc_input(k, s, s, W, b, nudge) for k in range(1, len(s))]

    @staticmethod
    def _fc_input(k, below, above, W, b=None, nudge=None):
        """The input of FC layer k: W_k·below[k−1] (+ b_k), plus the feedback W_{k+1}ᵀ·above[k+1]
        below the output; at the output, `nudge` (a function of that input adding the nudge
        term) if given. The steps pass the old or the newly updated states as below/above,
        which sets their update order."""
        gk = linear(below[k - 1].flatten(1), W[k - 1], None if b is None else b[k - 1])
        if k < len(W):
            return linear(above[k + 1], W[k].t(), add=gk)
        return gk if nudge is None else nudge(gk)

    def attention(self, g0, keys):
        """The Hopfield attention of the projection states: softmax(γ·g0·keysᵀ)."""
        return torch.softmax(self.gamma * (g0 @ keys.transpose(-1, -2)), dim=-1)

    def retrieve(self, g0, keys):
        """The Hopfield retrieval of the projection states: attention(g0)·keys."""
        return self.attention(g0, keys) @ keys

    def update(self, g, keys):
        """New states from the gradients: Hopfield retrieval for s[0], σ for the rest."""
        return [self.retrieve(g[0], keys)] + [self.act(gk) for gk in g[1:]]

    def step(self, s, drive, keys, beta=0.0, y=None, p=None):
        """One synchronous step of the dynamics, all layers updated from s(t)."""
        return self.update(self.grad_states(s, drive, beta, y, p), keys)

    def step_fc(self, s, drive, keys, beta=0.0, y=None, p=None):
        """One sweep of the dynamics for a fixed-point solver: the projection states first,
        retrieved from s[1] (they depend on nothing else), then the FC layers bottom-up, each
        from the new layer below and the old one above (Gauss–Seidel order, the way the input
        travels in the free phase). The same fixed points and matmuls as `step`; s[0] is not
        read, so the map acts on the FC states alone (a few hundred numbers per sample, what
        `fixed_point.anderson` with mix_from=1 mixes)."""
        _, W, b = self._split(p)
        nudge = (lambda g: g + beta * (one_hot(y, s[-1]) - s[-1])) if beta != 0.0 else None
        new = [self.retrieve(self._grad_projection(s[1], drive, p), keys)] + list(s[1:])
        for k in range(1, len(s)):
            new[k] = self.act(self._fc_input(k, new, s, W, b, nudge))
        return new

    # -- the nudged phases, relative to the free fixed point s0 -----------------------
    def nudged_setup(self, s0, drive, keys, beta0=0.0, y=None, p=None):
        """What every nudged step from s0 reuses: the pre-activations G0 = ∂Φ/∂s(s0; β0), the
        attention p0 at s0, and the free phase's residual r = F(s0) − s0 (0 at a fixed point)."""
        g0 = self.grad_states(s0, drive, beta0, y, p)
        p0 = self.attention(g0[0], keys)
        r = [p0 @ keys - s0[0]] + [self.act(g) - s for g, s in zip(g0[1:], s0[1:])]
        return g0, p0, r

    def delta_step(self, d, setup, keys, beta, nudge, p=None):
        """One synchronous step of the nudged dynamics written for δ = s − s0:
        δ' = F_β(s0 + δ) − s0 = r + [F_β(s0 + δ) − F_β0(s0)]. Φ is linear in each layer, so the
        pre-activations move by ΔG = (W·δ terms) + nudge − β·δ_N with nudge = (β − β0)(y − s0_N),
        and the states by σ(G0 + ΔG) − σ(G0), evaluated without forming G0 + ΔG
        (`ACTIVATION_DELTAS`, `softmax_delta`). Mathematically the plain step; numerically δ
        keeps its relative precision, so s₊ − s₋ is exact to float32 rounding of δ, not of s.
        beta: a 0-d tensor (no recompilation per value under torch.compile), or one value
        per row [B, 1]."""
        return [self._delta_projection(d[1], setup, keys, p)] + self._delta_fc(d, setup, beta, nudge, p)

    def delta_step_fc(self, d, setup, keys, beta, nudge, p=None):
        """`step_fc` for δ, in the order the nudge travels: the projection offsets from δ[1],
        then the FC layers top-down from the output, each from the new layer above and the old
        one below (layer 1 from the new projections). Reads δ[1:] only."""
        (g0, _, r), (_, W, _) = setup, self._split(p)
        output = lambda g: g + nudge - beta * d[-1]  # noqa: E731
        new = [self._delta_projection(d[1], setup, keys, p)] + list(d[1:])
        for k in range(len(d) - 1, 0, -1):
            new[k] = r[k] + self.act_delta(g0[k], self._fc_input(k, new, new, W, nudge=output))
        return new

    def _delta_projection(self, d1, setup, keys, p=None):
        (_, p0, r), W = setup, self._split(p)[1]
        dg0 = linear(d1, W[0].t()).view_as(r[0])
        return r[0] + softmax_delta(p0, self.gamma * (dg0 @ keys.transpose(-1, -2))) @ keys

    def _delta_fc(self, d, setup, beta, nudge, p=None):
        (g0, _, r), (_, W, _) = setup, self._split(p)
        output = lambda g: g + nudge - beta * d[-1]  # noqa: E731
        return [r[k] + self.act_delta(g0[k], self._fc_input(k, d, d, W, nudge=output)) for k in range(1, len(d))]

    STEP_METHODS = ("step", "delta_step", "step_fc", "delta_step_fc")

    def compile_step(self, mode=None):
        """Use torch.compile'd steps (`STEP_METHODS`) in the dynamics from now on (`relax`,
        `relax_nudged`, `relax_nudged_pair`); mode as in torch.compile (None, "max-autotune", ...).
        The batch size becomes dynamic after its first change and β is a tensor in the nudged
        steps, so one epoch with a ragged last batch, validation and test needs a few graphs
        per dtype and step."""
        backend = os.environ.get("SEQLEARN_EP_COMPILE_BACKEND", "inductor")  # tests: "eager"
        self.compiled = {name: torch.compile(getattr(self, name), mode=mode, dynamic=None, backend=backend)
                         for name in self.STEP_METHODS}
        return self

    def stepper(self, name):
        """The step method `name` (one of STEP_METHODS), compiled if compile_step() was called."""
        return self.compiled.get(name) or getattr(self, name)

    def step_reference(self, x, s, keys, beta=0.0, y=None):
        """The same step with ∂Φ/∂s from autograd of Φ: slow, for tests and benchmarks."""
        with torch.enable_grad():
            s = [t.detach().requires_grad_(True) for t in s]
            g = torch.autograd.grad(self.phi(x, s, beta, y).sum(), s)
        return [t.detach() for t in self.update(list(g), keys)]

    def hebbian(self, x, s, s_ref=None, diff=None):
        """∂Φ/∂θ at state s, averaged over the batch, aligned with `params()` (docs/method.md §2.5).
        With s_ref: the difference ∂Φ/∂θ(s) − ∂Φ/∂θ(s_ref), computed from the state differences
        so that the two nearly equal products never cancel inside a float32 (or TF32)
        accumulation: post·preᵀ − post_ref·pre_refᵀ = (post − post_ref)·preᵀ + post_ref·(pre − pre_ref)ᵀ,
        the same FLOPs as one product over a doubled batch (docs/precision.md).
        diff: s − s_ref when it is known more precisely than the rounded states give it."""
        B = s[0].shape[0]
        xs = self.inputs(x)
        if diff is None:
            diff = s if s_ref is None else [a - b for a, b in zip(s, s_ref)]
        out = [torch.einsum("bld,ble->de", diff[0][:, j], xs[q]) / B
               for j, (q, _) in enumerate(self.pairs)]
        for k in range(len(self.fc)):
            pre, dpost = s[k].flatten(1), diff[k + 1] / B
            if s_ref is None:
                out.append(linear(dpost.t(), pre.t()))  # s_{k+1} s_kᵀ
            else:
                dpre, post_ref = diff[k].flatten(1), s_ref[k + 1] / B
                out.append(linear(post_ref.t(), dpre.t(), add=linear(dpost.t(), pre.t())))
            out.append(diff[k + 1].mean(0))
        return out


def one_hot(y, like):
    return F.one_hot(y, like.shape[-1]).to(like.dtype)


def mse_loss(out, y):
    """ℓ(s_N, y) = ½‖s_N − onehot(y)‖², averaged over the batch."""
    return 0.5 * ((out - one_hot(y, out)) ** 2).sum(1).mean()


def flat_units(model, s):
    """Per FC layer, a bool [H_k] mask of the units that sit on a flat part of σ (state exactly
    at a saturation value) for every sample of the batch s. Smooth activations: never flat."""
    flat = ACTIVATION_FLAT.get(model.act_name)
    if flat is None:
        return [torch.zeros(t.shape[1], dtype=torch.bool, device=t.device) for t in s[1:]]
    return [((t == flat[0]) | (t == flat[1])).all(0) for t in s[1:]]


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


def plain_copy(model, dtype=None):
    """A deep copy (in `dtype` if given) that takes the plain, uncompiled steps: compiled
    steps belong to the original's bound methods and dtype."""
    compiled, model.compiled = model.compiled, {}
    try:
        new = copy.deepcopy(model)
    finally:
        model.compiled = compiled
    return new if dtype is None else new.to(dtype)


def build_model(cfg):
    """Rebuild an EPNet from its `config()` dict."""
    return EPNet(cfg["dataset"], cfg["seq_len"], cfg["embed_dim"], cfg["fc_layers"],
                 cfg["act"], cfg["gamma"])


# ----------------------------------------------------------------------------- dynamics
def relax(model, s, drive, keys, steps, beta=0.0, y=None, tol=None, p=None, x=None, anderson=0):
    """Run up to `steps` synchronous steps; with `tol`, stop once the largest relative
    state change max_k ‖Δs_k‖∞ / (‖s_k‖∞ + 1e-12) falls below it. Returns (s, steps used).
    `p`: parameters to use instead of the model's (e.g. bf16 copies). `x`: take the
    autograd-of-Φ reference steps on input x instead of the closed form (for benchmarks).
    anderson=m ≥ 2: Anderson mixing with window m of the FC states under `EPNet.step_fc`,
    towards the same fixed point (`fixed_point`); tol then bounds the relative residual.
    States in a low-precision dtype cannot resolve changes below its machine epsilon, so tol
    is at least that epsilon (bfloat16: 2⁻⁷ ≈ 0.0078; float32: 1.2e-7). bfloat16 dynamics
    often end in cycles of rounding flips larger than that: such a phase runs all its steps."""
    tol = _tol_floor(tol, s[0].dtype)
    if x is not None:
        return fixed_point.iterate(lambda z: model.step_reference(x, z, keys, beta, y), s, steps, tol)
    if anderson < 2:
        step = model.stepper("step")
        return fixed_point.iterate(lambda z: step(z, drive, keys, beta, y, p), s, steps, tol)
    step = model.stepper("step_fc")
    return fixed_point.anderson(lambda z: step(z, drive, keys, beta, y, p), s, steps, tol, anderson, mix_from=1)


def relax_nudged(model, s0, setup, keys, steps, beta, beta0=0.0, y=None, tol=None, p=None):
    """The nudged phase from the free state s0 (with `setup` = model.nudged_setup(s0, ...)),
    run on δ = s − s0 (`EPNet.delta_step`). Returns (δ, steps used); the stopping rule is
    relax's, on the states s0 + δ."""
    step, tol = model.stepper("delta_step"), _tol_floor(tol, s0[0].dtype)
    out = s0[-1]
    nudge = (beta - beta0) * (one_hot(y, out) - out)
    beta = torch.tensor(beta, dtype=out.dtype, device=out.device)
    measure = lambda new, old: max(_offset_change(a, b, s) for a, b, s in zip(new, old, s0))  # noqa: E731
    return fixed_point.iterate(lambda d: step(d, setup, keys, beta, nudge, p),
                               [torch.zeros_like(t) for t in s0], steps, tol, measure)


def relax_nudged_pair(model, s0, setup, keys, steps, beta, beta0=0.0, y=None, tol=None,
                      anderson=0, signs=(1, -1)):
    """The nudged phases with β = sign·beta for each sign, run together as one batch (2B for
    ±β), so they take the same number of steps (a symmetric estimate stays symmetric) and share
    each matmul. The stopping rule measures δ against itself, max_k ‖Δδ_k‖∞ / ‖δ_k‖∞, since the
    EP estimate is δ/β: a change relative to the states s0 + δ is O(β) smaller and would stop a
    phase long before δ has converged. anderson: window of Anderson mixing (0: plain steps).
    Returns ([δ per sign], steps per phase)."""
    tol = _tol_floor(tol, s0[0].dtype)
    step = model.stepper("delta_step_fc" if anderson >= 2 else "delta_step")
    out, B, n_ph = s0[-1], s0[-1].shape[0], len(signs)
    nudge = torch.cat([(sg * beta - beta0) * (one_hot(y, out) - out) for sg in signs])
    beta_rows = torch.cat([torch.full((B, 1), sg * beta, dtype=out.dtype, device=out.device)
                           for sg in signs])
    g0, p0, r = setup
    if n_ph > 1:
        g0, p0, r = [torch.cat([t] * n_ph) for t in g0], torch.cat([p0] * n_ph), [torch.cat([t] * n_ph) for t in r]
        keys = torch.cat([keys] * n_ph)
    d, n = fixed_point.anderson(lambda d: step(d, (g0, p0, r), keys, beta_rows, nudge),
                                [torch.zeros_like(t) for t in r], steps, tol, anderson, mix_from=1)
    return [[t[k * B:(k + 1) * B] for t in d] for k in range(n_ph)], n


def _tol_floor(tol, dtype):
    """A stopping tolerance no finer than the states' dtype can resolve (None: no early stop)."""
    return None if tol is None else max(tol, torch.finfo(dtype).eps)


def _offset_change(new, old, base):
    """relative_change's measure for one layer whose states are offsets from base."""
    return ((new - old).abs().max() / ((base + new).abs().max() + 1e-12)).item()


@torch.no_grad()
def seconds_per_step(model, x):
    """Wall time of one synchronous step of the dynamics on batch x (the second of two steps,
    so that one-time allocation is not counted): the unit of every time estimate."""
    drive, keys = model.precompute(x)
    s = model.step(model.init_states(x.shape[0], x.device, x.dtype), drive, keys)
    clock = Clock(x.device)
    model.step(s, drive, keys)
    return clock()


def check_finite(s, phase):
    """Divergence guard: raise naming the phase and layer of the first non-finite state."""
    for k, t in enumerate(s):
        if not torch.isfinite(t).all():
            name = "projection states s[0]" if k == 0 else f"layer s[{k}]"
            raise DivergenceError(f"non-finite values in {name} after the {phase} phase")


# EP estimators (docs/method.md §2): the Hebbian terms of two states are differenced and divided by
# the gap between their β. Each state is named by the sign of the nudge β2 it was reached with
# (0: the free state, at β1).
ESTIMATORS = {
    "one-sided": (1, 0),            # (∂Φ/∂θ(s^{+β2}) − ∂Φ/∂θ(s^{β1})) / (β2 − β1)
    "one-sided-negative": (0, -1),  # (∂Φ/∂θ(s^{β1}) − ∂Φ/∂θ(s^{−β2})) / (β1 + β2)
    "symmetric": (1, -1),           # (∂Φ/∂θ(s^{+β2}) − ∂Φ/∂θ(s^{−β2})) / 2β2, unbiased to first order
}


def estimator_name(estimator):
    """An ESTIMATORS name, from a name or from the original tool's thirdphase boolean
    (True: symmetric, False: one-sided)."""
    if isinstance(estimator, bool):
        return "symmetric" if estimator else "one-sided"
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown EP estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    return estimator


def estimator_gap(estimator, betas):
    """The β gap an estimator divides by (0 means the estimate is undefined)."""
    beta1, beta2 = betas
    a, b = ESTIMATORS[estimator_name(estimator)]
    return (beta1 if a == 0 else a * beta2) - (beta1 if b == 0 else b * beta2)


def ep_gradients(model, x, y, T, K, betas, estimator="symmetric", tol=None, free_dtype=None,
                 reference=False, free_tf32=False, anderson=0, tol_nudged=None, warm=None):
    """Free phase then nudged phase(s); set `.grad` of every parameter to the EP estimate
    of the loss gradient (docs/method.md §2). Returns (free-phase output [B, C], info dict with the
    steps used, the seconds spent in each phase and the free state's FC layers "free_fc").
    estimator: an ESTIMATORS name, or True/False as the original's --thirdphase (symmetric /
    one-sided); its nonzero signs are the nudged phases that run.
    free_dtype: run the free phase in this dtype on copies of the weights (torch.bfloat16:
    CPUs with avx512_bf16, CUDA); the nudged phases and the Hebbian estimate stay in the
    model's dtype (bf16 states would drown the small nudges of the lower layers).
    reference: take the autograd-of-Φ steps of the original implementation (slow).
    free_tf32: CUDA, the free phase's float32 matmuls in TF32; everything after it (nudged
    phases, Hebbian estimate) always runs in full float32.
    Fewer steps to the same fixed points (docs/speed.md): anderson=m mixes the last m
    iterates of every phase (at most T and K applications of the step); tol_nudged runs the
    nudged phases as one batch, stopped together when δ changes by less than tol_nudged relative
    to itself; warm: the FC states to start the free phase from (`EPNet.warm_states`)."""
    beta1, beta2 = betas
    est = estimator_name(estimator)
    pair, signs = ESTIMATORS[est], [sg for sg in ESTIMATORS[est] if sg != 0]
    clock, ref = Clock(x.device), x if reference else None
    with torch.no_grad(), cuda_tf32(free_tf32):
        drive, keys = model.precompute(x)
        if free_dtype in (None, x.dtype):
            p, dt = None, x.dtype
        elif reference:
            raise ValueError("the reference dynamics run in the model's dtype only")
        else:
            p, dt = [w.to(free_dtype) for w in model.params()], free_dtype
        fdrive, fkeys = drive.to(dt), keys.to(dt)
        init = model.init_states(x.shape[0], x.device, dt) if warm is None else \
            model.warm_states([t.to(dt) for t in warm], fdrive, fkeys, p)
        s0, n_free = relax(model, init, fdrive, fkeys, T, beta1, y, tol, p, x=ref, anderson=anderson)
        s0 = [t.to(x.dtype) for t in s0]
    with torch.no_grad(), cuda_tf32(False):
        if free_tf32:  # the input drive too: it enters every nudged step
            drive, keys = model.precompute(x)
        check_finite(s0, "free")
        free_s = clock()
        states, n_nudged = {0: s0}, 0
        if reference:  # the original: plain steps on the states, Hebbian from their difference
            for sg in signs:
                states[sg], n = relax(model, s0, drive, keys, K, sg * beta2, y, tol, x=ref)
                n_nudged += n
            diff = None
        else:
            setup = model.nudged_setup(s0, drive, keys, beta1, y)
            deltas = {0: [torch.zeros_like(t) for t in s0]}
            if anderson or tol_nudged is not None:
                ds, n = relax_nudged_pair(model, s0, setup, keys, K, beta2, beta1, y, tol_nudged, anderson, signs)
                deltas.update(zip(signs, ds))
                n_nudged = n * len(signs)
            else:
                for sg in signs:
                    deltas[sg], n = relax_nudged(model, s0, setup, keys, K, sg * beta2, beta1, y, tol)
                    n_nudged += n
            for sg in signs:
                states[sg] = [a + b for a, b in zip(s0, deltas[sg])]
            diff = [a - b for a, b in zip(deltas[pair[0]], deltas[pair[1]])]
        for sg in signs:
            check_finite(states[sg], f"nudged ({'+' if sg > 0 else '-'}beta)")
        nudged_s = clock()
        scale = estimator_gap(est, betas)
        for prm, h in zip(model.params(), model.hebbian(x, states[pair[0]], states[pair[1]], diff)):
            prm.grad = h.div_(-scale)
    return s0[-1], {"free_steps": n_free, "nudged_steps": n_nudged, "flat": flat_units(model, s0),
                    "free_s": free_s, "nudged_s": nudged_s, "hebbian_s": clock(), "free_fc": s0[1:]}


def _swap_matmul_precision(value):
    """Set CUDA's float32 matmul precision setting to `value` and return the previous one
    (a raw value of that setting, so it can be restored as it was). PyTorch >= 2.9 has
    fp32_precision ("tf32"/"ieee"), older versions allow_tf32; mixing both APIs is an error."""
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, name)
    setattr(m, name, value)
    return before


def set_cuda_tf32(enabled):
    """CUDA float32 matmuls in TF32 (10-bit mantissa) or full float32 from now on; returns the
    previous setting. No effect on the CPU."""
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    return _swap_matmul_precision(("tf32" if enabled else "ieee") if new_api else bool(enabled))


@contextlib.contextmanager
def cuda_tf32(enabled):
    """`set_cuda_tf32(enabled)` inside the block, the previous setting afterwards."""
    before = set_cuda_tf32(enabled)
    try:
        yield
    finally:
        _swap_matmul_precision(before)


class Clock:
    """Seconds since the previous call (or creation), synchronising CUDA first."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.last = self.now()

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self):
        last, self.last = self.last, self.now()
        return self.last - last


def bptt_gradients(model, x, y, T, K, checkpoint=0, free_tf32=False):
    """T−K free steps without a graph, K recorded steps, backprop of ℓ (docs/method.md §2, BPTT).
    checkpoint=c > 0: activation checkpointing, the K steps run in segments of c whose
    insides are recomputed during backprop; memory then holds K/c segment boundaries plus
    one segment's activations instead of all K steps (c ≈ √K is least), for one more forward.
    info: steps, and seconds without the graph (free_s) and with it plus backprop (nudged_s).
    free_tf32: CUDA, the T−K steps without a graph in TF32; the recorded ones in full float32."""
    clock = Clock(x.device)
    with torch.no_grad(), cuda_tf32(free_tf32):
        drive, keys = model.precompute(x)
        s, _ = relax(model, model.init_states(x.shape[0], x.device, x.dtype), drive, keys, T - K)
    free_s = clock()
    drive, keys = model.precompute(x)
    segment = checkpoint or K
    for start in range(0, K, segment):
        n = min(segment, K - start)
        if checkpoint:
            s = list(torch.utils.checkpoint.checkpoint(_steps, model, n, drive, keys, *s,
                                                       use_reentrant=False))
        else:
            s = _steps(model, n, drive, keys, *s)
    check_finite(s, "BPTT forward")
    model.zero_grad(set_to_none=True)
    mse_loss(s[-1], y).backward()
    return s[-1].detach(), {"free_steps": T, "nudged_steps": 0, "free_s": free_s,
                            "flat": flat_units(model, [t.detach() for t in s]),
                            "nudged_s": clock(), "hebbian_s": 0.0}


def _steps(model, n, drive, keys, *s):
    s = list(s)
    for _ in range(n):
        s = model.step(s, drive, keys)
    return s


def check_grads_finite(model):
    for name, prm in model.named_parameters():
        if prm.grad is not None and not torch.isfinite(prm.grad).all():
            raise DivergenceError(f"non-finite gradient for parameter {name}")


# ----------------------------------------------------------------------------- loops
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


def batches(n, batch_size, generator=None):
    """Index batches over n samples, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_epoch(model, optimizer, split, embeddings, hp, generator, desc="train", dist=None):
    """One epoch of EP or BPTT training. hp: dict with alg, T, K, betas, estimator (or the
    original's thirdphase boolean),
    batch_size, tol and optionally free_dtype, free_tf32, anderson, tol_nudged (see ep_gradients),
    warm (a fixed_point.WarmStarts over the split: read before and written after each free
    phase) and bptt_checkpoint (see bptt_gradients). dist: a dist_utils.Dist
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
        if len(idx):
            x = embed(embeddings, split.ids[idx].to(device), dtype)
            y = split.labels[idx].to(device)
            if hp["alg"] == "EP":
                warm = hp.get("warm")
                out, info = ep_gradients(model, x, y, hp["T"], hp["K"], hp["betas"],
                                         hp.get("estimator", hp.get("thirdphase")), hp.get("tol"),
                                         hp.get("free_dtype"),
                                         free_tf32=hp.get("free_tf32", False),
                                         anderson=hp.get("anderson") or 0, tol_nudged=hp.get("tol_nudged"),
                                         warm=None if warm is None else warm.get(idx, dtype))
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
                    stats=None, anderson=0):
    """Output layer after T free steps (β = 0) for every sample: [N, C]. free_dtype: run the
    steps in this dtype (e.g. torch.bfloat16) on copies of the weights. stats: a dict that
    receives the free steps used, averaged over the batches ("free_steps"). anderson: see relax."""
    device, dtype = embeddings.device, next(model.parameters()).dtype
    dt = free_dtype or dtype
    p = None if dt == dtype else [w.to(dt) for w in model.params()]
    model.eval()
    outs, used = [], []
    chunks = batches(len(ids), batch_size)
    for idx in tqdm(chunks, desc=desc, leave=False, disable=desc is None, dynamic_ncols=True):
        drive, keys = model.precompute(embed(embeddings, ids[idx].to(device), dtype))
        s, n = relax(model, model.init_states(len(idx), device, dt), drive.to(dt), keys.to(dt), T,
                     tol=tol, p=p, anderson=anderson)
        check_finite(s, "evaluation free")
        outs.append(s[-1].to(dtype).cpu())
        used.append(n)
    if stats is not None:
        stats["free_steps"] = sum(used) / max(len(used), 1)
    return torch.cat(outs) if outs else torch.zeros(0, model.n_classes)


def evaluate(model, split, embeddings, T, batch_size, tol=None, desc="eval", free_dtype=None, dist=None,
             stats=None, anderson=0):
    """Accuracy: argmax of the output after T free steps with β = 0. With dist, each rank
    evaluates its contiguous part of the split and the correct counts are summed. stats: see
    predict_outputs (this rank's batches)."""
    if len(split) == 0:
        return float("nan")
    idx = torch.arange(len(split)) if dist is None else dist.shard(torch.arange(len(split)))
    out = predict_outputs(model, split.ids[idx], embeddings, T, batch_size, tol, desc, free_dtype, stats,
                          anderson)
    correct = (out.argmax(1) == split.labels[idx]).sum().item()
    if dist is not None:
        correct = dist.sum([correct])[0]
    return correct / len(split)
