"""Convergent RNNs with modern-Hopfield projection layers, trained by Equilibrium Propagation.

Everything follows from one scalar, the primitive function Φ (docs/method.md §1), written here
as a sum of interaction terms: the Hopfield projections of the input, the dense synapse layers
and the cost. This module holds those terms, their per-dataset declaration (`declare_phi`), the
model `EPNet` whose dynamics and Hebbian estimate loop over the terms, the fixed-point phases,
the EP estimators and update, and the BPTT baseline. How each layer's state follows its
pre-activation (σ, the Hopfield retrieval) and the matmul kernel are in `ops`, the fixed-point
solvers in `fixed_point`, the training and evaluation loops in `loops`.

Conventions (docs/method.md): a state is a list `s` of tensors; `s[0]` is s0, the stack of
projection states [B, P, L, D] (P = 1 for IMDB, 4 for SNLI), `s[k]` for k ≥ 1 the fully
connected layer s_k [B, H_k], `s[-1]` = s_N the output. Parameters are, in order, the P
projection matrices U_j [D, D] (`proj.j`) and (W_k, b_k) of each dense layer from s_k to s_{k+1}
(`fc.k`); `model.params()` returns them as a list `p` and every function below accepts such a
list so that checks can pass per-step copies.
"""
import math
import os

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

import registry
from devices import Clock, cuda_tf32
from fixed_point import relax, relax_nudged, relax_nudged_pair  # the phases (the steps run to a fixed point)
import ops
from ops import ACTIVATION_CENTRE, ACTIVATION_FLAT, ACTIVATIONS, INITS, HopfieldUnits, SigmaUnits, linear, one_hot


class DivergenceError(RuntimeError):
    """A state, output or gradient became NaN/Inf."""


# ----------------------------------------------------------------------------- Φ's terms
# Φ is a sum of interaction terms (docs/method.md §1). A term couples a few state layers (its
# `layers`, indices into the state list s) and owns `n_params` consecutive entries of
# `EPNet.params()`. It knows its value, its gradient with respect to each state it touches
# (added to the pre-activation `acc` that the other terms of that layer build up, so the
# dynamics fuse the adds into the matmuls), the change of that gradient when the states move
# by δ (`delta`: the part linear in δ, which the nudged phases run on), and its gradient with
# respect to its parameters, the Hebbian term, from a state or the difference of two.
# `ctx` carries what is fixed during a phase: the input fields "x", the input drive "drive",
# the attended "keys", "beta", "y", and in the nudged phases "nudge" = (β − β0)(y − s0_N).
class Term:
    layers, n_params = (), 0

    def value(self, s, ctx, prm):
        raise NotImplementedError

    def grad(self, k, src, ctx, prm, acc):
        raise NotImplementedError

    def delta(self, k, d, ctx, prm, acc):
        raise NotImplementedError

    def hebbian(self, s, s_ref, diff, ctx, prm):
        raise NotImplementedError

    def groups(self, prm):
        """Its parameters as synapse layers, one learning rate each (`--lrs`)."""
        return [list(prm)] if prm else []

    def flops(self, B):
        """Matmul FLOPs of one step (its state gradients) and of one Hebbian term."""
        return 0, 0


class HopfieldProjections(Term):
    """Σ_j ⟨s0_j, x_{q_j} U_jᵀ⟩: P Hopfield projection layers side by side. Layer j takes its
    queries from input field q_j through U_j ∈ R^{D×D} (`proj.j`) and retrieves over field k_j,
    the keys and values (`pairs` = ((q_j, k_j), ...), the registry entry's `projections`). Its
    state gradient is the input drive x_q·U_jᵀ, fixed during the phases (`precompute`)."""
    layers = (0,)

    def __init__(self, pairs, L, D):
        self.pairs, self.L, self.D = [tuple(q) for q in pairs], L, D
        self.n_params = len(self.pairs)

    def precompute(self, xs, prm):
        """The drive [B, P, L, D] and the keys/values [B, P, L, D] from the input fields xs."""
        drive = torch.stack([xs[q] @ u.t() for (q, _), u in zip(self.pairs, prm)], 1)
        return drive, torch.stack([xs[k] for _, k in self.pairs], 1)

    def value(self, s, ctx, prm):
        return (s[0] * ctx["drive"]).flatten(1).sum(1)

    def grad(self, k, src, ctx, prm, acc):
        drive = ctx["drive"].flatten(1)
        return drive if acc is None else acc + drive

    def delta(self, k, d, ctx, prm, acc):
        return acc  # input-only: unchanged by δ

    def hebbian(self, s, s_ref, diff, ctx, prm):
        B = diff[0].shape[0]
        return [torch.einsum("bld,ble->de", diff[0][:, j], ctx["x"][q]) / B for j, (q, _) in enumerate(self.pairs)]

    def groups(self, prm):
        return [[u] for u in prm]

    def flops(self, B):
        return 0, 2 * B * len(self.pairs) * self.L * self.D ** 2


class Dense(Term):
    """⟨s_{k+1}, W_k vec(s_k) + b_k⟩: a fully connected synapse layer (`fc.k`) from layer k to k+1."""
    n_params = 2

    def __init__(self, k, n_in, n_out):
        self.layers, self.n_in, self.n_out = (k, k + 1), n_in, n_out

    def value(self, s, ctx, prm):
        k = self.layers[0]
        return (s[k + 1] * F.linear(s[k].flatten(1), *prm)).sum(1)

    def grad(self, k, src, ctx, prm, acc, bias=True):
        (pre, post), (W, b) = self.layers, prm
        if k == post:  # W_k s_k + b_k
            return linear(src[pre].flatten(1), W, b if bias else None, add=acc)
        return linear(src[post], W.t(), add=acc)  # W_kᵀ s_{k+1}

    def delta(self, k, d, ctx, prm, acc):
        return self.grad(k, d, ctx, prm, acc, bias=False)

    def hebbian(self, s, s_ref, diff, ctx, prm):
        """s_{k+1} s_kᵀ and s_{k+1}; for a difference, (post − post_ref)·preᵀ + post_ref·(pre − pre_ref)ᵀ
        so that two nearly equal products never cancel in a float32 accumulation (docs/precision.md)."""
        (pre, post), B = self.layers, diff[0].shape[0]
        x, dpost = s[pre].flatten(1), diff[post] / B
        if s_ref is None:
            w = linear(dpost.t(), x.t())
        else:
            w = linear((s_ref[post] / B).t(), diff[pre].flatten(1).t(), add=linear(dpost.t(), x.t()))
        return [w, diff[post].mean(0)]

    def flops(self, B):
        mm = 2 * B * self.n_in * self.n_out
        return 2 * mm, mm  # forward and feedback; Hebbian


class Cost(Term):
    """−β ℓ(s_N, y) = −β ½‖s_N − onehot(y)‖²: the nudge on the output layer N."""

    def __init__(self, N):
        self.layers = (N,)

    @staticmethod
    def _beta(ctx):
        """β of the phase, or None for a free phase given as the number 0 (no term at all)."""
        beta = ctx.get("beta", 0.0)
        return None if not isinstance(beta, torch.Tensor) and beta == 0.0 else beta

    def value(self, s, ctx, prm):
        beta, out = self._beta(ctx), s[self.layers[0]]
        if beta is None:
            return torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        return -beta * 0.5 * ((out - one_hot(ctx["y"], out)) ** 2).sum(1)

    def grad(self, k, src, ctx, prm, acc):
        beta = self._beta(ctx)
        if beta is None:
            return acc
        return acc + beta * (one_hot(ctx["y"], src[k]) - src[k])

    def delta(self, k, d, ctx, prm, acc):
        return acc + ctx["nudge"] - ctx["beta"] * d[k]  # (β − β0)(y − s0_N) − β δ_N

    def hebbian(self, s, s_ref, diff, ctx, prm):
        return []


def declare_phi(spec, L, D, fc_layers, act, gamma):
    """Φ of a registry dataset (IMDB: one projection, SNLI: four) as (terms, units): the Hopfield
    projections of its input fields, a chain of dense layers on their flattened states, the
    cost on the output; the Hopfield retrieval for the projection states, σ for the rest.
    The terms are listed in the order of `EPNet.params()`."""
    P, sizes = len(spec.projections), [len(spec.projections) * L * D] + list(fc_layers)
    terms = [HopfieldProjections(spec.projections, L, D)]
    terms += [Dense(k, a, b) for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    terms.append(Cost(len(fc_layers)))
    units = [HopfieldUnits(P, L, D, gamma)] + [SigmaUnits(h, act) for h in fc_layers]
    return terms, units


# ----------------------------------------------------------------------------- the model
class EPNet(nn.Module):
    """Convergent RNN: P parallel Hopfield projection layers followed by an FC stack
    (docs/method.md §1). Φ is the sum of `self.terms`; the dynamics, the Hebbian estimate and
    the work counts loop over them, so a new layer type is a new Term (and Units)."""

    def __init__(self, dataset, seq_len, embed_dim, fc_layers, act="my_hard_sig", gamma=None,
                 init="centred"):
        super().__init__()
        spec = registry.get(dataset)  # its inputs, projection pairs and γ (registry.py)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(ACTIVATIONS)}")
        self.dataset, self.L, self.D = spec.name, int(seq_len), int(embed_dim)
        self.fc_layers, self.act_name = [int(h) for h in fc_layers], act
        self.pairs, self.n_inputs = [tuple(q) for q in spec.projections], spec.n_fields
        self.P = len(self.pairs)
        self.gamma = float(gamma if gamma is not None else spec.gamma or 1.0 / math.sqrt(self.D))
        self.terms, self.units = declare_phi(spec, self.L, self.D, self.fc_layers, act, self.gamma)
        self._index_terms()
        self.compiled = {}  # method name -> its torch.compile'd version (compile_step())
        self.merge_keys = False  # retrieve over each sequence's distinct keys (`--merge-keys`, precompute)
        self.proj = nn.ParameterList([nn.Parameter(torch.empty(self.D, self.D)) for _ in self.pairs])
        self.fc = nn.ModuleList([nn.Linear(t.n_in, t.n_out) for t in self.terms if isinstance(t, Dense)])
        for w in self.proj:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # same law as nn.Linear
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
        if init == "centred":
            self.centre_biases()

    def _index_terms(self):
        self.touching = [[i for i, t in enumerate(self.terms) if k in t.layers] for k in range(len(self.units))]

    def add_term(self, name, term, *params):
        """Add an interaction term to Φ, with its parameters (registered as `name.0`, `name.1`, …
        after all others, so the term goes last in `terms`). The dynamics, the nudged steps,
        the Hebbian estimate, BPTT, the GDU check and the FLOP count then include it; it is
        one more synapse layer (one more --lrs value) per entry of its `groups`."""
        term.n_params = len(params)
        setattr(self, name, nn.ParameterList(params))
        self.terms.append(term)
        self._index_terms()
        return self

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
        return len(self.layer_groups())

    def config(self):
        """The JSON-able architecture, enough to rebuild the model."""
        return {"dataset": self.dataset, "seq_len": self.L, "embed_dim": self.D,
                "fc_layers": self.fc_layers, "act": self.act_name, "gamma": self.gamma}

    def params(self):
        """Parameters as a flat list p: [U_0..U_{P−1} (proj), W_0, b_0, W_1, b_1, ... (fc)], the
        terms' parameters in their order."""
        return list(self.parameters())

    def param_names(self):
        return [n for n, _ in self.named_parameters()]

    def term_params(self, p=None):
        """p (default: the model's parameters) cut into each term's list."""
        p, out, i = self.params() if p is None else p, [], 0
        for t in self.terms:
            out.append(p[i:i + t.n_params])
            i += t.n_params
        return out

    def layer_groups(self):
        """One list of parameters per synapse layer (projections first), for per-layer lrs."""
        return [g for t, prm in zip(self.terms, self.term_params()) for g in t.groups(prm)]

    # -- input-only terms, once per batch ----------------------------------------------
    def inputs(self, x):
        """x: [B, L, D] (one input field, IMDB) or [B, F, L, D] (SNLI: premise, hypothesis)
        -> list of F input sequences [B, L, D], the fields of the dataset's registry entry."""
        return [x] if self.n_inputs == 1 else list(x.unbind(1))

    def precompute(self, x, p=None, merge=None):
        """Bottom-up drive x·Uᵀ [B, P, L, D] and the attended keys/values [B, P, L, D]; with
        merge (default: self.merge_keys) the keys as `ops.merge_keys` gives them, each
        sequence's distinct vectors and their log multiplicities: the same retrieval, exactly,
        over fewer keys (the reference dynamics, the original's, never merge)."""
        drive, keys = self.terms[0].precompute(self.inputs(x), self.term_params(p)[0])
        return drive, ops.merge_keys(keys) if (self.merge_keys if merge is None else merge) else keys

    def key_order(self, keys):
        """For merged keys (`precompute` with self.merge_keys): the batch rows ordered by their
        number of distinct keys, fewest first, the order in which the retrieval's runs of rows
        skip the most padded slots (`ops.MergedKeys.chunks`); None for keys as they are. The
        samples of a batch are independent, so callers run them in this order and put the
        outputs back."""
        return torch.argsort(keys.counts, stable=True) if isinstance(keys, ops.MergedKeys) else None

    def in_key_order(self, inputs):
        """`precompute`'s (drive, keys) with the batch rows in `key_order`, and that order
        (None, and the inputs as they are, for keys not merged)."""
        order = self.key_order(inputs[1])
        return (inputs, None) if order is None else ((inputs[0][order], inputs[1].take(order)), order)

    def init_states(self, batch_size, device=None, dtype=None):
        """All layers at zero: [B, P, L, D] then [B, H_k] for each FC layer."""
        return [u.zeros(batch_size, device=device, dtype=dtype) for u in self.units]

    def warm_states(self, fc, drive, keys, p=None):
        """A starting point from the fully connected states alone (a warm start,
        `fixed_point.WarmStarts`): the projection states are what the step makes of s_1,
        softmax(γ·(drive + W_0ᵀ s_1)·keysᵀ)·keys, the value they take at any fixed point."""
        s, ctx = [None] + list(fc), {"drive": drive, "keys": keys}
        return [self.units[0].update(self.pre_activation(0, s, ctx, self.term_params(p)), ctx)] + list(fc)

    # -- Φ and its gradients ----------------------------------------------------------
    def phi(self, x, s, beta=0.0, y=None, p=None):
        """Primitive function Φ(x, s, θ; β, y) per sample, shape [B] (docs/method.md §1)."""
        ctx = {"drive": self.precompute(x, p, merge=False)[0], "beta": beta, "y": y}
        return sum(t.value(s, ctx, prm) for t, prm in zip(self.terms, self.term_params(p)))

    def pre_activation(self, k, src, ctx, tp, delta=False):
        """∂Φ/∂s_k at the states src, summed over the terms touching layer k in their order
        (delta: its change when the states move by src, for the nudged steps)."""
        acc = None
        for i in self.touching[k]:
            acc = (self.terms[i].delta if delta else self.terms[i].grad)(k, src, ctx, tp[i], acc)
        return acc

    def grad_states(self, s, drive, beta=0.0, y=None, p=None):
        """Closed-form ∂Φ/∂s_k for every layer (docs/method.md §1, 'one step of the dynamics')."""
        ctx, tp = {"drive": drive, "beta": beta, "y": y}, self.term_params(p)
        return [self.pre_activation(k, s, ctx, tp).view_as(s[k]) for k in range(len(s))]

    def attention(self, g0, keys):
        """The Hopfield attention of the projection states: softmax(γ·g0·keysᵀ)."""
        return self.units[0].attention(g0, keys)

    def retrieve(self, g0, keys):
        """The Hopfield retrieval of the projection states: attention(g0)·keys."""
        return self.units[0].update(g0, {"keys": keys})

    def update(self, g, keys):
        """New states from the gradients: Hopfield retrieval for s0, σ for the rest."""
        ctx = {"keys": keys}
        return [u.update(gk, ctx) for u, gk in zip(self.units, g)]

    def sweep(self, s, ctx, p, order, gauss_seidel):
        """Update the layers in `order`, each from ∂Φ/∂s at the current states: the old ones
        (synchronous, as the theorem's step), or the newest (gauss_seidel: a layer reads the
        layers already updated in this sweep)."""
        tp, new = self.term_params(p), list(s)
        src = new if gauss_seidel else s
        for k in order:
            new[k] = self.units[k].update(self.pre_activation(k, src, ctx, tp), ctx)
        return new

    def step(self, s, drive, keys, beta=0.0, y=None, p=None):
        """One synchronous step of the dynamics, all layers updated from s(t)."""
        return self.sweep(s, {"drive": drive, "keys": keys, "beta": beta, "y": y}, p, range(len(s)), False)

    def step_fc(self, s, drive, keys, beta=0.0, y=None, p=None):
        """One sweep of the dynamics for a fixed-point solver: the projection states first,
        retrieved from s_1 (they depend on nothing else), then the FC layers bottom-up, each
        from the new layer below and the old one above (Gauss–Seidel order, the way the input
        travels in the free phase). The same fixed points and matmuls as `step`; s0 is not
        read, so the map acts on the FC states alone (a few hundred numbers per sample, what
        `fixed_point.anderson` with mix_from=1 mixes)."""
        return self.sweep(s, {"drive": drive, "keys": keys, "beta": beta, "y": y}, p, range(len(s)), True)

    # -- the nudged phases, relative to the free fixed point s0 -----------------------
    def nudged_setup(self, s0, drive, keys, beta0=0.0, y=None, p=None):
        """What every nudged step from s0 reuses: the pre-activations G0 = ∂Φ/∂s(s0; β0), each
        layer's linearisation there (the attention p0 of the projection states), and the free
        phase's residual r = F(s0) − s0 (0 at a fixed point)."""
        g0, ctx = self.grad_states(s0, drive, beta0, y, p), {"keys": keys}
        lin = [u.linearise(g, ctx) for u, g in zip(self.units, g0)]
        return g0, [a for a, _ in lin], [f - s for (_, f), s in zip(lin, s0)]

    def delta_sweep(self, d, setup, ctx, p, order, gauss_seidel):
        """`sweep` on δ = s − s0: δ_k' = r_k + F_k(G0_k + ΔG_k) − F_k(G0_k), ΔG from the terms' `delta`."""
        (g0, aux, r), tp, new = setup, self.term_params(p), list(d)
        src = new if gauss_seidel else d
        for k in order:
            dg = self.pre_activation(k, src, ctx, tp, delta=True)
            new[k] = r[k] + self.units[k].delta(g0[k], aux[k], dg, ctx)
        return new

    def delta_step(self, d, setup, keys, beta, nudge, p=None):
        """One synchronous step of the nudged dynamics written for δ = s − s0:
        δ' = F_β(s0 + δ) − s0 = r + [F_β(s0 + δ) − F_β0(s0)]. Φ is linear in each layer, so the
        pre-activations move by ΔG = (W·δ terms) + nudge − β·δ_N with nudge = (β − β0)(y − s0_N),
        and the states by σ(G0 + ΔG) − σ(G0), evaluated without forming G0 + ΔG
        (`ACTIVATION_DELTAS`, `softmax_delta`). Mathematically the plain step; numerically δ
        keeps its relative precision, so s₊ − s₋ is exact to float32 rounding of δ, not of s.
        beta: a 0-d tensor (no recompilation per value under torch.compile), or one value
        per row [B, 1]."""
        ctx = {"keys": keys, "beta": beta, "nudge": nudge}
        return self.delta_sweep(d, setup, ctx, p, range(len(d)), False)

    def delta_step_fc(self, d, setup, keys, beta, nudge, p=None):
        """`step_fc` for δ, in the order the nudge travels: the projection offsets from δ1,
        then the FC layers top-down from the output, each from the new layer above and the old
        one below (layer 1 from the new projections). Reads δ[1:] only."""
        ctx = {"keys": keys, "beta": beta, "nudge": nudge}
        return self.delta_sweep(d, setup, ctx, p, [0] + list(range(len(d) - 1, 0, -1)), True)

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
        """∂Φ/∂θ at state s, averaged over the batch, aligned with `params()` (docs/method.md §2),
        each term's own. With s_ref: the difference ∂Φ/∂θ(s) − ∂Φ/∂θ(s_ref), which the terms
        compute from the state differences so that two nearly equal products never cancel inside
        a float32 (or TF32) accumulation (docs/precision.md). diff: s − s_ref when it is known
        more precisely than the rounded states give it."""
        if diff is None:
            diff = s if s_ref is None else [a - b for a, b in zip(s, s_ref)]
        ctx = {"x": self.inputs(x)}
        return [h for t, prm in zip(self.terms, self.term_params())
                for h in t.hebbian(s, s_ref, diff, ctx, prm)]

    def flops(self, B):
        """Matmul FLOPs of one synchronous step and of one Hebbian term, summed over the terms
        and units (the benchmark's work counts)."""
        per_term = [t.flops(B) for t in self.terms]
        return (sum(f for f, _ in per_term) + sum(u.flops(B) for u in self.units),
                sum(h for _, h in per_term))


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


def build_model(cfg):
    """Rebuild an EPNet from its `config()` dict."""
    return EPNet(cfg["dataset"], cfg["seq_len"], cfg["embed_dim"], cfg["fc_layers"],
                 cfg["act"], cfg["gamma"])


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


# --bf16-matmul rounds the nudged retrieval's keys to bfloat16 too (False: the weights only, for
# tools/ab_switch.py model_utils.BF16_KEYS; docs/speed.md)
BF16_KEYS = True


def ep_gradients(model, x, y, T, K, betas, estimator="symmetric", tol=None, free_dtype=None,
                 reference=False, free_tf32=False, anderson=0, tol_nudged=None, warm=None, sample_exit=False,
                 bf16_matmul=False):
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
    to itself; warm: the FC states to start the free phase from (`EPNet.warm_states`);
    sample_exit: each sample leaves a phase on its own stopping rule (`fixed_point.solve_per_sample`);
    bf16_matmul (with tol_nudged): the nudged phases multiply by bfloat16 copies of the weights
    and keys, δ and everything else staying in the model's dtype (docs/speed.md)."""
    beta1, beta2 = betas
    est = estimator_name(estimator)
    pair, signs = ESTIMATORS[est], [sg for sg in ESTIMATORS[est] if sg != 0]
    clock = Clock(x.device)
    inputs, order = None, None
    if model.merge_keys and not reference:  # merged keys: the rows by their distinct keys
        inputs, order = model.in_key_order(model.precompute(x))
    if order is not None:
        x, y, warm = x[order], y[order], None if warm is None else [t[order] for t in warm]
    with torch.no_grad(), cuda_tf32(free_tf32):
        s0, n_free, drive, keys = free_phase(model, x, y, T, beta1, tol, free_dtype, reference, anderson, warm,
                                             sample_exit, inputs)
    with torch.no_grad(), cuda_tf32(False):
        if free_tf32:  # the input drive too: it enters every nudged step
            drive, keys = model.precompute(x, merge=False if reference else None)
        check_finite(s0, "free")
        free_s = clock()
        if reference:  # the original: plain steps on the states, Hebbian from their difference
            states, n_nudged = {0: s0}, 0
            for sg in signs:
                states[sg], n = relax(model, s0, drive, keys, K, sg * beta2, y, tol, x=x)
                n_nudged += n
            diff = None
        else:
            states, diff, n_nudged = nudged_phases(model, s0, drive, keys, y, K, betas, pair, tol, anderson, tol_nudged,
                                                   sample_exit, bf16_matmul)
        for sg in signs:
            check_finite(states[sg], f"nudged ({'+' if sg > 0 else '-'}beta)")
        nudged_s = clock()
        scale = estimator_gap(est, betas)
        for prm, h in zip(model.params(), model.hebbian(x, states[pair[0]], states[pair[1]], diff)):
            prm.grad = h.div_(-scale)
    out, free_fc = s0[-1], s0[1:]
    if order is not None:  # the caller's row order again
        back = torch.argsort(order)
        out, free_fc = out[back], [t[back] for t in free_fc]
    return out, {"free_steps": n_free, "nudged_steps": n_nudged, "flat": flat_units(model, s0),
                 "free_s": free_s, "nudged_s": nudged_s, "hebbian_s": clock(), "free_fc": free_fc}


def free_phase(model, x, y, T, beta1=0.0, tol=None, free_dtype=None, reference=False, anderson=0, warm=None,
               sample_exit=False, inputs=None):
    """The free phase of `ep_gradients` (its arguments), run in free_dtype on copies of the
    weights when that differs from x's. Returns the free state s⁰ in x's dtype, the steps taken,
    and the input drive and keys in x's dtype (`EPNet.precompute`; inputs: those, computed
    already)."""
    drive, keys = inputs or model.precompute(x, merge=False if reference else None)
    if free_dtype in (None, x.dtype):
        p, dt = None, x.dtype
    elif reference:
        raise ValueError("the reference dynamics run in the model's dtype only")
    else:
        p, dt = [w.to(free_dtype) for w in model.params()], free_dtype
    fdrive, fkeys = drive.to(dt), keys.to(dt)
    init = model.init_states(x.shape[0], x.device, dt) if warm is None else \
        model.warm_states([t.to(dt) for t in warm], fdrive, fkeys, p)
    s0, n = relax(model, init, fdrive, fkeys, T, beta1, y, tol, p, x=x if reference else None, anderson=anderson,
                  sample_exit=sample_exit)
    return [t.to(x.dtype) for t in s0], n, drive, keys


def nudged_phases(model, s0, drive, keys, y, K, betas, pair, tol=None, anderson=0, tol_nudged=None,
                  sample_exit=False, bf16_matmul=False):
    """The nudged phases of an estimator `pair` (ESTIMATORS) from the free state s0, run on
    offsets δ = s − s0: together with a solver (`relax_nudged_pair`), else one by one. Returns
    ({sign: state}, the δ difference of the pair, steps over all phases).
    bf16_matmul: the δ steps multiply by bfloat16 copies of the weights and of the keys
    (`ops.retrieval_delta`); δ, the setup at s0 and the stopping rule stay float32 (the
    products' rounding is relative to δ, not to s)."""
    beta1, beta2 = betas
    signs = [sg for sg in pair if sg != 0]
    setup = model.nudged_setup(s0, drive, keys, beta1, y)
    deltas, n_nudged = {0: [torch.zeros_like(t) for t in s0]}, 0
    if bf16_matmul and tol_nudged is None:
        raise ValueError("bf16_matmul needs tol_nudged")
    if anderson or tol_nudged is not None:
        p16 = [w.to(torch.bfloat16) for w in model.params()] if bf16_matmul else None
        nkeys = keys.to(torch.bfloat16) if bf16_matmul and BF16_KEYS else keys
        ds, n = relax_nudged_pair(model, s0, setup, nkeys, K, beta2, beta1, y, tol_nudged, anderson, signs,
                                  sample_exit, p16)
        deltas.update(zip(signs, ds))
        n_nudged = n * len(signs)
    else:
        for sg in signs:
            deltas[sg], n = relax_nudged(model, s0, setup, keys, K, sg * beta2, beta1, y, tol)
            n_nudged += n
    states = {0: s0, **{sg: [a + b for a, b in zip(s0, deltas[sg])] for sg in signs}}
    return states, [a - b for a, b in zip(deltas[pair[0]], deltas[pair[1]])], n_nudged


def bptt_gradients(model, x, y, T, K, checkpoint=0, free_tf32=False):
    """T−K free steps without a graph, K recorded steps, backprop of ℓ (docs/method.md §2, BPTT).
    checkpoint=c > 0: activation checkpointing, the K steps run in segments of c whose
    insides are recomputed during backprop; memory then holds K/c segment boundaries plus
    one segment's activations instead of all K steps (c ≈ √K is least), for one more forward.
    info: steps, and seconds without the graph (free_s) and with it plus backprop (nudged_s).
    free_tf32: CUDA, the T−K steps without a graph in TF32; the recorded ones in full float32."""
    clock = Clock(x.device)
    with cuda_tf32(free_tf32):
        s, _, _ = steps_before_window(model, x, T, K)
    free_s = clock()
    drive, keys = model.precompute(x)  # again, with the graph to the projections
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


@torch.no_grad()
def steps_before_window(model, x, T, K):
    """The free phase up to BPTT's window: T−K synchronous steps from zero, without a graph
    (the K steps after them are the ones BPTT, and the GDU check, record). Returns the states
    and the input drive and keys they were run with."""
    drive, keys = model.precompute(x)
    return relax(model, model.init_states(x.shape[0], x.device, x.dtype), drive, keys, T - K)[0], drive, keys


def _steps(model, n, drive, keys, *s):
    s = list(s)
    for _ in range(n):
        s = model.step(s, drive, keys)
    return s


