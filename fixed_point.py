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
"""
import torch


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
    B, dtype = z[0].shape[0], z[0].dtype
    work = torch.promote_types(dtype, torch.float32)
    # per layer [B, m, n_k] histories, so that every new iterate is one contiguous tensor per
    # layer (the layout the fast matmul kernels take)
    hist_f = [t.new_empty(B, m, t[0].numel(), dtype=work) for t in z[mix_from:]]  # images F(zᵢ)
    hist_g = [t.new_empty(B, m, t[0].numel(), dtype=work) for t in z[mix_from:]]  # residuals
    gram = z[0].new_zeros(B, m, m, dtype=work)
    valid = torch.zeros(B, m, dtype=torch.bool, device=z[0].device)  # columns in each sample's history
    last = torch.full((B,), float("inf"), dtype=work, device=z[0].device)  # its last residual norm²
    fz = f(z)
    for k in range(steps):
        if tol is not None and measure(fz, z) < tol:
            return fz, k + 1
        if k == steps - 1:
            break
        i, n = k % m, min(k + 1, m)
        row = 0
        for hf, hg, a, b in zip(hist_f, hist_g, fz[mix_from:], z[mix_from:]):
            hf[:, i] = a.reshape(B, -1)
            torch.sub(hf[:, i], b.reshape(B, -1), out=hg[:, i])
            row = row + torch.bmm(hg[:, :n], hg[:, i, :, None]).squeeze(-1)  # [B, n]
        gram[:, i, :n], gram[:, :n, i] = row, row
        # safeguard for the kinks of hard activations: a sample whose residual grew restarts
        # its history from the newest point (one plain step), so it never does worse than
        # plain iteration for long
        norm = row[:, i]
        valid[norm > last] = False
        valid[:, i], last = True, norm
        alpha = _mixing_weights(gram[:, :n, :n], valid[:, :n], i, reg)[:, None, :]
        z = list(fz[:mix_from]) + [torch.bmm(alpha, hf[:, :n]).view(t.shape).to(dtype)
                                   for hf, t in zip(hist_f, fz[mix_from:])]
        fz = f(z)
    return fz, steps


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
