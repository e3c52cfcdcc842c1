"""Fixed-point solvers for the dynamics: plain synchronous iteration or Anderson mixing.

Both phases of EP look for a fixed point s* = F(s*) of a step map F (the synchronous step of
docs/method.md §1, or its nudged version on δ = s − s0). Plain iteration applies F again and
again. Anderson mixing (type II, window m) takes as next iterate the combination Σ αᵢ F(zᵢ) of
the last m images whose residuals F(zᵢ) − zᵢ combine to the smallest norm (Σ αᵢ = 1), solved
per sample, since the samples of a batch are independent problems. It reaches the same fixed
point in fewer applications of F. Every function takes the states as a list of tensors whose
first axis is the batch, and `f` as a function from such a list to a new one.

The stopping rule is the tool's one convergence measure, `relative_change`: the largest
relative change of any layer over one application of F (for Anderson, the relative residual
of the current iterate). The GDU check never comes here with Anderson: the theorem is about
the plain synchronous steps.

The phases are those solvers run on a model's steps: `relax` (the free phase, or any phase on
the states), `relax_nudged` (a nudged phase on δ = s − s0) and `relax_nudged_pair` (the ±β
phases as one batch); `model_utils.ep_gradients` and `bptt_gradients` call them.
"""
import torch

from ops import one_hot


def relative_change(new, old):
    """max_k ‖new_k − old_k‖∞ / ‖new_k‖∞ over the layers (the whole batch at once)."""
    return max(((a - b).abs().max() / (a.abs().max() + 1e-12)).item() for a, b in zip(new, old))


def iterate(f, z, steps, tol=None, measure=relative_change):
    """Plain iteration z ← f(z), at most `steps` times; with tol, stop once measure(f(z), z)
    falls below it. Returns (the last f(z), applications of f)."""
    for t in range(steps):
        new = f(z)
        if tol is not None and measure(new, z) < tol:
            return new, t + 1
        z = new
    return z, steps


def anderson(f, z, steps, tol=None, m=5, measure=relative_change, reg=1e-7, mix_from=0):
    """Anderson mixing with window m (m < 2: plain iteration), at most `steps` applications
    of f, stopping as `iterate` does on the relative residual measure(f(z), z) of the current
    iterate. Returns (f of the last iterate, applications of f). The mixing weights solve, per
    sample, min ‖Σ αᵢ gᵢ‖² with Σ αᵢ = 1 (gᵢ the stored residuals) through the normal
    equations with a Tikhonov term `reg` relative to their diagonal; a sample whose system is
    singular takes the plain step. Histories are kept in float32 at least (bfloat16 states).
    mix_from=j: only layers j, j+1, ... are mixed (and count in the residual's weights); the
    layers before them are taken from f's image, for maps that do not read them
    (`EPNet.step_fc`)."""
    if m < 2:
        return iterate(f, z, steps, tol, measure)
    mix = _History(z, m, mix_from, reg)
    fz = f(z)
    for k in range(steps):
        if tol is not None and measure(fz, z) < tol:
            return fz, k + 1
        if k == steps - 1:
            break
        z = mix.next(k, fz, z)
        fz = f(z)
    return fz, steps


def sample_change(new, old, group=1):
    """relative_change per sample: max_k ‖new_k − old_k‖∞ / ‖new_k‖∞ over each row's layers,
    [rows / group]. group = n: each sample is n consecutive rows (its ±β phases, run as one
    batch), and its measure is the largest over them."""
    r = None
    for a, b in zip(new, old):
        a, b = a.flatten(1), b.flatten(1)
        v = (a - b).abs().amax(1) / (a.abs().amax(1) + 1e-12)
        r = v if r is None else torch.maximum(r, v)
    return r.view(-1, group).amax(1)


def solve_per_sample(f, z, ctx, steps, tol, m=5, group=1, reg=1e-7, mix_from=0, shared=None):
    """Plain iteration (m < 2) or Anderson mixing as `iterate` and `anderson` do, except that
    each sample leaves the batch as soon as its own relative residual (`sample_change`) is
    below tol: its f(z) is final, and the batch, its histories and the batch-first tensors of
    `ctx` (nested lists or tuples, None allowed) shrink to the samples still running. The
    samples of a batch are independent problems and the mixing weights are per sample, so the
    others' iterates are unchanged. f(z, ctx, shared) applies the map to the running samples.
    group = n: each sample is n consecutive rows (its ±β phases), which leave together, so both
    phases of a sample take the same number of steps; `shared` (nested as ctx) holds one row
    per sample, whatever group is (what its n rows share: the nudged phases' attention at the
    free state and the keys), and shrinks with the samples. Returns (f of each
    sample's last iterate, in the original row order; applications of f per sample, averaged:
    the work done, in steps of the whole batch)."""
    if steps < 1:
        return list(z), 0
    B0 = z[0].shape[0] // group
    out = [torch.empty_like(t) for t in z]
    live = torch.arange(B0, device=z[0].device)  # the original sample index of each running sample
    mix = _History(z, m, mix_from, reg) if m >= 2 else None
    fz, work_done = f(z, ctx, shared), 0
    for k in range(steps):
        work_done += live.numel()
        done = sample_change(fz, z, group) < tol
        if k == steps - 1:
            done[:] = True
        if bool(done.any()):
            here = _group_rows(done.nonzero().squeeze(1), group)
            there = _group_rows(live[done], group)
            for o, t in zip(out, fz):
                o[there] = t[here]
            if bool(done.all()):
                break
            kept = (~done).nonzero().squeeze(1)
            keep = _group_rows(kept, group)
            live = live[~done]
            z, fz, ctx, shared = _take(z, keep), _take(fz, keep), _take(ctx, keep), _take(shared, kept)
            if mix is not None:
                mix.take(keep)
        z = fz if mix is None else mix.next(k, fz, z)
        fz = f(z, ctx, shared)
    return out, work_done / B0


def _group_rows(idx, group):
    """The rows of samples idx when each sample is `group` consecutive rows."""
    if group == 1:
        return idx
    return (idx[:, None] * group + torch.arange(group, device=idx.device)).flatten()


def _repeat(obj, n):
    """obj (as in `_take`) with each batch row repeated n times in a row (`_group_rows`)."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat_interleave(n, dim=0)
    if isinstance(obj, (list, tuple)):
        return _like(obj, [_repeat(o, n) for o in obj])
    return obj


def _take(obj, rows):
    """obj (a tensor, or nested lists/tuples of them and None) at the given batch rows."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows)
    if isinstance(obj, (list, tuple)):
        return _like(obj, [_take(o, rows) for o in obj])
    return obj


def _like(obj, items):
    """A list, tuple or named tuple (`ops.MergedKeys`) of obj's type holding items."""
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


class _History:
    """Anderson's memory for a batch: per layer [B, m, n_k] histories of the images F(zᵢ) and
    residuals gᵢ = F(zᵢ) − zᵢ (one contiguous tensor per layer and iterate, the layout the fast
    matmul kernels take), their Gram matrix, and the safeguard's state. Kept in float32 at
    least (bfloat16 states)."""

    def __init__(self, z, m, mix_from, reg):
        B, self.dtype, self.m, self.mix_from, self.reg = z[0].shape[0], z[0].dtype, m, mix_from, reg
        work = torch.promote_types(self.dtype, torch.float32)
        self.f = [t.new_empty(B, m, t[0].numel(), dtype=work) for t in z[mix_from:]]
        self.g = [t.new_empty(B, m, t[0].numel(), dtype=work) for t in z[mix_from:]]
        self.gram = z[0].new_zeros(B, m, m, dtype=work)
        self.valid = torch.zeros(B, m, dtype=torch.bool, device=z[0].device)  # columns in each sample's history
        self.last = torch.full((B,), float("inf"), dtype=work, device=z[0].device)  # its last residual norm²

    def next(self, k, fz, z):
        """The k-th mixed iterate from the newest image fz = F(z)."""
        i, n, B, mf = k % self.m, min(k + 1, self.m), z[0].shape[0], self.mix_from
        row = 0
        for hf, hg, a, b in zip(self.f, self.g, fz[mf:], z[mf:]):
            hf[:, i] = a.reshape(B, -1)
            torch.sub(hf[:, i], b.reshape(B, -1), out=hg[:, i])
            row = row + torch.bmm(hg[:, :n], hg[:, i, :, None]).squeeze(-1)  # [B, n]
        self.gram[:, i, :n], self.gram[:, :n, i] = row, row
        # safeguard for the kinks of hard activations: a sample whose residual grew restarts
        # its history from the newest point (one plain step), so it never does worse than
        # plain iteration for long
        norm = row[:, i]
        self.valid[norm > self.last] = False
        self.valid[:, i], self.last = True, norm
        alpha = _mixing_weights(self.gram[:, :n, :n], self.valid[:, :n], i, self.reg)[:, None, :]
        return list(fz[:mf]) + [torch.bmm(alpha, hf[:, :n]).view(t.shape).to(self.dtype)
                                for hf, t in zip(self.f, fz[mf:])]

    def take(self, rows):
        """Keep the given batch rows only (samples that left the batch, `solve_per_sample`)."""
        self.f, self.g, self.gram, self.valid, self.last = _take(
            [self.f, self.g, self.gram, self.valid, self.last], rows)


def _mixing_weights(gram, valid, newest, reg):
    """α [B, n] with Σα = 1 minimising αᵀ·gram·α over each sample's valid columns (the others
    get α = 0); the plain step (all weight on the newest image) where the system is singular
    or not finite."""
    B, n, _ = gram.shape
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    v = valid.to(gram.dtype)
    mask = v[:, :, None] * v[:, None, :]
    scale = (gram.diagonal(dim1=1, dim2=2) * v).sum(-1) / v.sum(-1)
    scale = scale.clamp(min=torch.finfo(gram.dtype).tiny)
    a, info = torch.linalg.solve_ex(gram * mask + (reg * scale)[:, None, None] * eye + (1 - v)[:, :, None] * eye,
                                    v[:, :, None])
    a = a.squeeze(-1)
    a = a / a.sum(-1, keepdim=True)
    bad = (info != 0) | ~torch.isfinite(a).all(-1)
    if bool(bad.any()):
        a[bad] = eye[newest]
    return a


class WarmStarts:
    """The fully connected part of each training sample's last free fixed point, stored in
    float16 (states of σ lie in [0, 1]; float16 keeps 11 bits), so that the next epoch's free
    phase of that sample starts there instead of at zero (`EPNet.warm_states` rebuilds the
    projection states from it exactly). Memory: samples × Σ H_k × 2 bytes. A sample not yet
    stored starts from FC states at zero (the cold start, with its projections already
    retrieved). The table travels in checkpoint.pt, so a resumed run continues exactly; under
    torchrun `sync` gives every rank every row after each epoch."""

    def __init__(self, n, sizes, device=None):
        self.sizes = list(sizes)
        self.table = torch.zeros(n, sum(self.sizes), dtype=torch.float16, device=device)
        self.written = torch.zeros(n, dtype=torch.bool, device=device)  # rows stored this epoch

    @property
    def nbytes(self):
        return self.table.numel() * self.table.element_size()

    def get(self, idx, dtype):
        rows = self.table[idx.to(self.table.device)].to(dtype)
        return list(rows.split(self.sizes, 1))

    def put(self, idx, fc_states):
        idx = idx.to(self.table.device)
        self.table[idx] = torch.cat(fc_states, 1).to(self.table)
        self.written[idx] = True

    def sync(self, dist=None):
        """End of an epoch. Each sample went to exactly one rank, so summing over ranks the rows
        each rank stored this epoch gives every rank the whole table."""
        if dist is not None:
            rows = torch.where(self.written[:, None], self.table.float(), 0.0)
            stale = dist.sum_tensor(self.written.float()) == 0  # no rank stored these: keep them
            self.table = torch.where(stale[:, None], self.table, dist.sum_tensor(rows).to(self.table))
        self.written.zero_()

    def state(self):
        return self.table.cpu()

    def load(self, table):
        if tuple(table.shape) != tuple(self.table.shape):
            raise ValueError(f"warm-start table of shape {tuple(table.shape)} does not fit this run "
                             f"({tuple(self.table.shape)})")
        self.table = table.to(self.table)


# ----------------------------------------------------------------------------- the phases
_anderson = anderson  # the phases' `anderson` argument is the window size


def relax(model, s, drive, keys, steps, beta=0.0, y=None, tol=None, p=None, x=None, anderson=0,
          sample_exit=False):
    """Run up to `steps` synchronous steps; with `tol`, stop once the largest relative
    state change max_k ‖Δs_k‖∞ / (‖s_k‖∞ + 1e-12) falls below it. Returns (s, steps used).
    `p`: parameters to use instead of the model's (e.g. bf16 copies). `x`: take the
    autograd-of-Φ reference steps on input x instead of the closed form (for benchmarks).
    anderson=m ≥ 2: Anderson mixing with window m of the FC states under `EPNet.step_fc`,
    towards the same fixed point (`fixed_point`); tol then bounds the relative residual.
    States in a low-precision dtype cannot resolve changes below its machine epsilon, so tol
    is at least that epsilon (bfloat16: 2⁻⁷ ≈ 0.0078; float32: 1.2e-7). bfloat16 dynamics
    often end in cycles of rounding flips larger than that: such a phase runs all its steps.
    sample_exit (with tol): each sample stops on its own relative change (`solve_per_sample`);
    the steps returned are then the per-sample average."""
    tol = _tol_floor(tol, s[0].dtype)
    if sample_exit and tol is not None and x is None:
        name = "step_fc" if anderson >= 2 else "step"
        step = model.stepper(name)
        return solve_per_sample(lambda z, c, _: step(z, c[0], c[1], beta, c[2], p), s, (drive, keys, y),
                                steps, tol, anderson, mix_from=1 if anderson >= 2 else 0)
    if x is not None:
        return iterate(lambda z: model.step_reference(x, z, keys, beta, y), s, steps, tol)
    if anderson < 2:
        step = model.stepper("step")
        return iterate(lambda z: step(z, drive, keys, beta, y, p), s, steps, tol)
    step = model.stepper("step_fc")
    return _anderson(lambda z: step(z, drive, keys, beta, y, p), s, steps, tol, anderson, mix_from=1)


def relax_nudged(model, s0, setup, keys, steps, beta, beta0=0.0, y=None, tol=None, p=None):
    """The nudged phase from the free state s0 (with `setup` = model.nudged_setup(s0, ...)),
    run on δ = s − s0 (`EPNet.delta_step`). Returns (δ, steps used); the stopping rule is
    relax's, on the states s0 + δ."""
    step, tol = model.stepper("delta_step"), _tol_floor(tol, s0[0].dtype)
    out = s0[-1]
    nudge = (beta - beta0) * (one_hot(y, out) - out)
    beta = torch.tensor(beta, dtype=out.dtype, device=out.device)
    measure = lambda new, old: max(_offset_change(a, b, s) for a, b, s in zip(new, old, s0))  # noqa: E731
    return iterate(lambda d: step(d, setup, keys, beta, nudge, p),
                   [torch.zeros_like(t) for t in s0], steps, tol, measure)


def relax_nudged_pair(model, s0, setup, keys, steps, beta, beta0=0.0, y=None, tol=None,
                      anderson=0, signs=(1, -1), sample_exit=False, p=None):
    """The nudged phases with β = sign·beta for each sign, run together as one batch (2B rows
    for ±β, a sample's rows next to each other), so they take the same number of steps (a symmetric estimate stays symmetric) and share
    each matmul. The stopping rule measures δ against itself, max_k ‖Δδ_k‖∞ / ‖δ_k‖∞, since the
    EP estimate is δ/β: a change relative to the states s0 + δ is O(β) smaller and would stop a
    phase long before δ has converged. anderson: window of Anderson mixing (0: plain steps).
    sample_exit (with tol): each sample's phases stop together on its own measure (the largest
    over its rows, `solve_per_sample`); the steps returned are then the per-sample average.
    p: parameters to use instead of the model's (bfloat16 copies: `--bf16-matmul`).
    Returns ([δ per sign], steps per phase)."""
    tol = _tol_floor(tol, s0[0].dtype)
    step = model.stepper("delta_step_fc" if anderson >= 2 else "delta_step")
    out, B, n_ph = s0[-1], s0[-1].shape[0], len(signs)
    # each sample's n_ph rows next to each other (`_group_rows`); what its phases share at the
    # free state, the projection units' setup (the attention p0 [B, P, L, U]) and the keys,
    # stays one row per sample: `HopfieldUnits.delta` takes it for all of the sample's rows
    nudge = torch.stack([(sg * beta - beta0) * (one_hot(y, out) - out) for sg in signs], 1).flatten(0, 1)
    beta_rows = (torch.tensor(signs, dtype=out.dtype, device=out.device) * beta).repeat(B)[:, None]
    g0, aux, r = setup
    rows = ([None] + _repeat(g0[1:], n_ph), [None] + _repeat(aux[1:], n_ph), _repeat(r, n_ph), beta_rows, nudge)
    shared = (g0[0], aux[0], keys)

    def f(d, c, sh):
        return step(d, ([sh[0]] + c[0][1:], [sh[1]] + c[1][1:], c[2]), sh[2], c[3], c[4], p)

    start = [torch.zeros_like(t) for t in rows[2]]
    if sample_exit and tol is not None:
        d, n = solve_per_sample(f, start, rows, steps, tol, anderson, group=n_ph,
                                mix_from=1 if anderson >= 2 else 0, shared=shared)
    else:
        d, n = _anderson(lambda d: f(d, rows, shared), start, steps, tol, anderson, mix_from=1)
    return [[t[k::n_ph].contiguous() for t in d] for k in range(n_ph)], n


def _tol_floor(tol, dtype):
    """A stopping tolerance no finer than the states' dtype can resolve (None: no early stop)."""
    return None if tol is None else max(tol, torch.finfo(dtype).eps)


def _offset_change(new, old, base):
    """relative_change's measure for one layer whose states are offsets from base."""
    return ((new - old).abs().max() / ((base + new).abs().max() + 1e-12)).item()
