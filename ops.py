"""The building blocks of the dynamics: the activations σ, their exact differences
σ(a + d) − σ(a) and the softmax's (the nudged phases run on such differences, docs/precision.md),
the CPU matmul kernel choice (`linear`: oneDNN where it runs, probed per dtype), and the units:
how each kind of layer's state follows its pre-activation (σ, the Hopfield retrieval)."""
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


def one_hot(y, like):
    """Labels y [B] as rows of like's last size and dtype."""
    return F.one_hot(y, like.shape[-1]).to(like.dtype)


# ----------------------------------------------------------------------------- activations
def my_sigmoid(x):
    return torch.sigmoid(4.0 * (x - 0.5))


def hard_sigmoid(x):
    return (1.0 + F.hardtanh(2.0 * x - 1.0)) * 0.5


def my_hard_sig(x):
    return (1.0 + F.hardtanh(x - 1.0)) * 0.5


ACTIVATIONS = {
    "my_sigmoid": my_sigmoid,
    "mysig": my_sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "my_hard_sig": my_hard_sig,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


# σ(a + d) − σ(a) without forming a + d: the nudged phases move the states by tiny amounts d
# from the free fixed point, and a + d rounded to float32 would lose most of d's digits.
def _clamp_delta(lo, hi, scale):  # σ(x) = scale·clamp(x, lo, hi) + const
    def delta(a, d):
        return scale * (torch.minimum(torch.maximum(d, lo - a), hi - a) + (a - a.clamp(lo, hi)))
    return delta


def _sigmoid_delta(a, d):  # σ(a+d) − σ(a) = σ(a+d)·(1 − σ(a))·(1 − e^(−d))
    return torch.sigmoid(a + d) * torch.sigmoid(-a) * -torch.expm1(-d)


def _my_sigmoid_delta(a, d):
    return _sigmoid_delta(4.0 * (a - 0.5), 4.0 * d)


def _tanh_delta(a, d):  # tanh(a+d) − tanh(a) = sinh(d) / (cosh(a)·cosh(a+d))
    return torch.sinh(d) / (torch.cosh(a) * torch.cosh(a + d))


# The pre-activation at the middle of σ's working range, and the state values σ takes on its
# flat parts (where ∂σ = 0: a unit there passes no nudge and gets no gradient).
ACTIVATION_CENTRE = {"my_sigmoid": 0.5, "mysig": 0.5, "hard_sigmoid": 0.5, "my_hard_sig": 1.0,
                     "tanh": 0.0, "sigmoid": 0.0}
ACTIVATION_FLAT = {"hard_sigmoid": (0.0, 1.0), "my_hard_sig": (0.0, 1.0)}
INITS = ("centred", "torch")

ACTIVATION_DELTAS = {
    "my_sigmoid": _my_sigmoid_delta, "mysig": _my_sigmoid_delta,
    "hard_sigmoid": _clamp_delta(0.0, 1.0, 1.0),   # (1 + hardtanh(2x − 1))/2 = clamp(x, 0, 1)
    "my_hard_sig": _clamp_delta(0.0, 2.0, 0.5),    # (1 + hardtanh(x − 1))/2 = clamp(x, 0, 2)/2
    "tanh": _tanh_delta, "sigmoid": _sigmoid_delta,
}


def softmax_delta(p0, ds):
    """softmax(S0 + ds) − softmax(S0) along the last axis from p0 = softmax(S0), to the relative
    precision of ds: with v = e^ds − 1 (expm1), p' − p0 = p0·(v − Σp0v)/(1 + Σp0v). Eagerly it
    makes one temporary (v, updated in place) and a batched dot for Σp0v: the nudged phases run
    this on [B, P, L, L] every step, where the temporaries of the plain expression cost more
    than the step's matmuls (docs/speed.md). Where e^ds overflows (ds > 88 in float32, never
    for a nudge) it shifts ds by c = max ds − 60 per row, which leaves the softmax unchanged."""
    if torch.compiler.is_compiling():  # inductor fuses the plain expression into one kernel
        return _softmax_delta_shifted(p0, ds)
    v = torch.expm1(ds)
    m = torch.linalg.vecdot(p0, v).unsqueeze(-1)
    if not bool(torch.isfinite(m).all()):
        return _softmax_delta_shifted(p0, ds)
    return v.sub_(m).mul_(p0).div_(m.add_(1.0))


def retrieval_delta(p0, s0, dq, keys):
    """The change of a Hopfield retrieval softmax(S0 + dq·Kᵀ)·K − softmax(S0)·K when its queries
    move by dq [.., L, D], from p0 = softmax(S0) and s0 = p0·K, to the relative precision of
    ds = dq·Kᵀ: with v = e^ds − 1 and m = Σp0v it is ((p0⊙v)·K − m·s0)/(1 + m), the identity of
    `softmax_delta` with the subtraction moved after the product, onto [.., L, D] instead of
    [.., L, L]. Eagerly the only passes over the L×L values are expm1 (in place on ds), the
    product with p0 and its row sum: about 0.6 of the time of softmax_delta and the product at
    400 tokens (docs/speed.md). Where e^ds overflows, the shifted softmax_delta.
    dq may hold n moves of the same queries, [.., n·L, D] (the ±β phases of a sample: one
    product with the keys for both, p0 and s0 read once); the result is then [.., n·L, D].
    Keys in a lower precision than dq (bfloat16 copies, --bf16-matmul): the two products in
    their dtype (oneDNN runs them 2-4x faster than MKL's float32 batched kernel on CPUs with
    AVX512-BF16), rounding at 2⁻⁹ relative to ds and to the weighted keys, that is to the change
    δ, not to the states; expm1, the weights, their sum and the subtraction stay in dq's dtype."""
    low = keys.dtype if keys.dtype != dq.dtype else None
    ds = _product(dq, keys.transpose(-1, -2), low)
    n = ds.shape[-2] // p0.shape[-2]
    if torch.compiler.is_compiling():
        return _product(_grouped(softmax_delta, p0, ds, n), keys, low)
    w = _grouped(lambda p, v: v.expm1_().mul_(p), p0, ds, n)
    m = w.sum(-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):  # ds was overwritten: form it again
        ds = _product(dq, keys.transpose(-1, -2), low)
        return _product(_grouped(_softmax_delta_shifted, p0, ds, n), keys, low)
    out = _product(w, keys, low).sub_(_grouped(lambda s, mm: mm * s, s0, m, n))
    return out.div_(m.add_(1.0))


def _product(a, b, low=None):
    """a @ b, in the dtype `low` when given (the result back in a's dtype)."""
    return a @ b if low is None else (a.to(low) @ b).to(a.dtype)


def _grouped(fn, p, v, n):
    """fn(p, v) for v [.., n·L, X] holding n blocks of L rows that each pair with p [.., L, X']
    (broadcast over the blocks), as [.., n·L, X]."""
    if n == 1:
        return fn(p, v)
    out = fn(p.unsqueeze(-3), v.unflatten(-2, (n, p.shape[-2])))
    return out.flatten(-3, -2)


CHUNK_ROWS, CHUNK_MIN_KEYS = 12, 64  # runs of rows of the merged retrieval (`MergedKeys.chunks`)


class MergedKeys(NamedTuple):
    """The keys of a Hopfield retrieval whose keys are also its values (the input tokens),
    merged (`merge_keys`): each sequence's distinct vectors [B, P, U, D], the log of their
    multiplicities as a logit bias [B, P, 1, U] (float32 at least; −inf on the unused slots),
    and each row's number of distinct keys, the most over its P sequences [B]. A key that occurs c times gets
    the weight c·e^(q·k) in the softmax, its logit plus log c, so the softmax over the U
    distinct keys with that bias, times them, is the retrieval over all L keys, exactly (only
    the order of the float sums changes)."""
    values: torch.Tensor
    bias: torch.Tensor
    counts: torch.Tensor

    def to(self, dtype):
        """The key vectors in dtype, the bias in dtype but float32 at least (added into the
        logits, never rounded to bfloat16 on its own)."""
        bias_dtype = torch.promote_types(dtype, torch.float32)
        return self._replace(values=self.values.to(dtype), bias=self.bias.to(bias_dtype))

    def take(self, rows):
        """The given batch rows."""
        return MergedKeys(*(t[rows] for t in self))

    def chunks(self):
        """(rows, their keys [r, P, u, D], their bias [r, P, 1, u]) for contiguous runs of about
        CHUNK_ROWS rows, u the most distinct keys in the run: on rows sorted by their counts
        (`EPNet.key_order`) the runs of few keys skip most of the padded slots (IMDB at 400
        tokens, batches of 50 in 4 runs: 0.39 of the L×L work, against 0.61 in one run). One
        run of all rows when the keys are few (< CHUNK_MIN_KEYS, where the retrieval costs
        little) or under torch.compile (one graph)."""
        B, U = self.values.shape[0], self.values.shape[-2]
        n_chunks = max(1, round(B / CHUNK_ROWS))
        if torch.compiler.is_compiling() or U < CHUNK_MIN_KEYS or n_chunks == 1:
            return [(slice(0, B), self.values, self.bias)]
        n = self.counts.tolist()
        bounds = [round(i * B / n_chunks) for i in range(n_chunks + 1)]
        return [(slice(a, b), self.values[a:b, ..., :u, :], self.bias[a:b, ..., :u])
                for a, b in zip(bounds, bounds[1:]) for u in [max(n[a:b])]]


def _key_hash(k):
    """An integer hash of each key vector's bits [N, L]: equal vectors, equal hash."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[k.element_size()]
    bits = k.detach().contiguous().view(ints).to(torch.int64)
    return (bits * torch.arange(1, bits.shape[-1] + 1, device=k.device).mul_(0x9E3779B1)).sum(-1)


def _distinct(k):
    """For keys [N, L, D]: them sorted so that equal vectors are neighbours, and which of the
    sorted ones start a new distinct vector [N, L] (neighbours compared exactly, so two
    different vectors are never merged)."""
    order = _key_hash(k).argsort(-1)
    ks = k.gather(1, order[..., None].expand(-1, -1, k.shape[-1]))
    first = torch.ones(ks.shape[:2], dtype=torch.bool, device=k.device)
    first[:, 1:] = (ks[:, 1:] != ks[:, :-1]).any(-1)
    return ks, first


def merge_keys(keys, worth=0.8):
    """keys [B, P, L, D] -> MergedKeys, U the most distinct keys of any sequence in the batch
    (IMDB reviews at 400 tokens hold 131 distinct ids on average, padding one of them, and at
    most about 240 in a batch of 50); the slots past a sequence's own count hold zero keys
    with bias −inf (weight 0). The keys as they were when merging saves little: U > worth·L
    and too few keys to run in chunks of rows (SNLI: 23 of 25 in a batch of 100)."""
    *lead, L, D = keys.shape
    ks, first = _distinct(keys.reshape(-1, L, D))
    slot = first.cumsum(1) - 1  # [N, L]: the distinct key each sorted position is
    U = int(slot[:, -1].max()) + 1
    if U > worth * L and U < CHUNK_MIN_KEYS:
        return keys
    dt = torch.promote_types(keys.dtype, torch.float32)
    count = torch.zeros(ks.shape[0], U, dtype=dt, device=ks.device).scatter_add_(
        1, slot, torch.ones_like(slot, dtype=dt))
    uniq = ks.new_zeros(ks.shape[0], U, D).scatter(1, slot[..., None].expand(-1, -1, D), ks)
    rows = (slot[:, -1] + 1).view(lead[0], -1).amax(1)
    return MergedKeys(uniq.view(*lead, U, D), count.log().view(*lead, 1, U), rows)


def _softmax_delta_shifted(p0, ds):
    c = (ds.amax(-1, keepdim=True) - 60.0).clamp(min=0.0)
    v = torch.expm1(ds - c)
    m = (p0 * v).sum(-1, keepdim=True)
    return p0 * (v - m) / (1.0 + m)


def _onednn_linear_works(dtype):
    """Whether oneDNN's fused linear (plain and with a fused add) runs in `dtype` on this CPU.
    bfloat16 needs AVX512-BF16/AVX-512BW (or AVX-NE-CONVERT): AVX2-only CPUs refuse it."""
    if os.environ.get("SEQLEARN_EP_NO_ONEDNN"):  # to test the fallback on any machine
        return False
    try:
        x = torch.ones(2, 3, dtype=dtype)
        ref = (x.float() @ x.float().t()).to(dtype)
        return (torch.equal(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], ""), ref)
                and torch.equal(torch.ops.mkldnn._linear_pointwise.binary(x, ref, x, None, "add"), 2 * ref))
    except (AttributeError, RuntimeError):
        return False


# dtypes in which `linear` uses oneDNN on the CPU; others (and autograd) take F.linear.
ONEDNN_DTYPES = {dt for dt in (torch.float32, torch.bfloat16)
                 if torch.backends.mkldnn.is_available() and _onednn_linear_works(dt)}
ONEDNN_LINEAR = bool(ONEDNN_DTYPES)


def bf16_notice(device):
    """None when bfloat16 runs fast on `device`; else a one-line notice of the fallback. Raises
    ValueError when PyTorch cannot compute the dynamics in bfloat16 there at all."""
    device = torch.device(device)
    try:
        x = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
        torch.softmax(F.linear(x, x) @ x, -1)
    except RuntimeError as e:
        raise ValueError(f"--bf16: PyTorch cannot compute in bfloat16 on {device} "
                         f"({str(e).splitlines()[0][:100]}); drop --bf16") from None
    if device.type == "cpu" and torch.bfloat16 not in ONEDNN_DTYPES:
        return ("notice: this CPU lacks oneDNN's bfloat16 kernels (they need AVX512-BF16 or "
                "AVX-512BW/VL/DQ); --bf16 falls back to PyTorch's generic bfloat16 matmul, "
                "which is correct but slower than float32 here")
    return None


def _plain(t):  # a layout oneDNN takes: 2-D, row- or column-major
    return t.dim() == 2 and (t.is_contiguous() or t.t().is_contiguous())


def _onednn_linear(x, w, b=None, add=None):
    if add is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, b, "add")


if ONEDNN_LINEAR:  # an opaque op for torch.compile, which would otherwise pick MKL's GEMM
    @torch.library.custom_op("seqlearn_ep::onednn_linear", mutates_args=())
    def _onednn_linear_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                          add: Optional[torch.Tensor]) -> torch.Tensor:
        return _onednn_linear(x, w, b, add)

    @_onednn_linear_op.register_fake
    def _(x, w, b, add):
        return x.new_empty(x.shape[0], w.shape[0])


def linear(x, w, b=None, add=None):
    """x·wᵀ + b (+ add, fused), the dynamics' hot path. On CPU without autograd, in the dtypes
    where oneDNN's kernel runs here (`ONEDNN_DTYPES`: float32 on x86, bfloat16 only where the
    CPU has the instructions), it takes that kernel, which uses AVX-512 where the CPU has it,
    while MKL (behind torch.matmul, and the GEMM torch.compile picks) may stay on AVX2 (about
    2x slower on AMD); elsewhere F.linear. Same dtype in, accumulation and out as F.linear."""
    if w.dtype != x.dtype and w.dtype.itemsize < x.dtype.itemsize:
        # low-precision copies of the weights (--bf16-matmul): the product in their dtype,
        # returned in the states' (the rounding is that of w's dtype, the states stay as they are)
        out = linear(x.to(w.dtype), w, b).to(x.dtype)
        return out if add is None else out.add_(add)
    if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype in ONEDNN_DTYPES
            and w.dtype == x.dtype and _plain(x) and _plain(w)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        if torch.compiler.is_compiling():
            return torch.ops.seqlearn_ep.onednn_linear(x, w, b, add)
        return _onednn_linear(x, w, b, add)
    out = F.linear(x, w, b)
    return out if add is None else out + add


# ----------------------------------------------------------------------------- units
# How a layer's state follows its pre-activation g = ∂Φ/∂s: `update` (the step), and around a
# free state with pre-activation g0, `linearise` (what the nudged steps reuse) and `delta`,
# the exact change F(g0 + dg) − F(g0) without forming g0 + dg (docs/precision.md).
class HopfieldUnits:
    """P stacked projection states [B, P, L, D]: the modern-Hopfield retrieval
    s0 = softmax(γ·g·Kᵀ)·K over the keys K = ctx["keys"]."""

    def __init__(self, P, L, D, gamma):
        self.shape, self.gamma = (P, L, D), gamma

    def zeros(self, B, **kw):
        return torch.zeros(B, *self.shape, **kw)

    def attention(self, g, keys):
        """softmax(γ·g·Kᵀ) over the keys; MergedKeys: over the distinct ones, each logit plus
        its log multiplicity, computed per run of rows (`MergedKeys.chunks`), [B, P, L, U]."""
        g = g.view(-1, *self.shape)
        if not isinstance(keys, MergedKeys):
            return torch.softmax(self.gamma * (g @ keys.transpose(-1, -2)), dim=-1)
        U = keys.values.shape[-2]
        return torch.cat([F.pad(self._merged_attention(g[r], k, b), (0, U - k.shape[-2]))
                          for r, k, b in keys.chunks()])

    def _merged_attention(self, g, k, bias):
        return torch.softmax(((g * self.gamma) @ k.transpose(-1, -2)).add_(bias), dim=-1)

    def update(self, g, ctx):
        keys = ctx["keys"]
        if not isinstance(keys, MergedKeys):
            return self.attention(g, keys) @ keys
        g = g.view(-1, *self.shape)
        return torch.cat([self._merged_attention(g[r], k, b) @ k for r, k, b in keys.chunks()])

    def linearise(self, g0, ctx):
        keys = ctx["keys"]
        if not isinstance(keys, MergedKeys):
            p0 = self.attention(g0, keys)
            s = p0 @ keys
            return (p0, s), s
        g0, U, p0, s = g0.view(-1, *self.shape), keys.values.shape[-2], [], []
        for r, k, b in keys.chunks():
            p0.append(self._merged_attention(g0[r], k, b))
            s.append(p0[-1] @ k)
            p0[-1] = F.pad(p0[-1], (0, U - k.shape[-2]))
        s = torch.cat(s)
        return (torch.cat(p0), s), s

    def delta(self, g0, aux, dg, ctx):
        """aux and the keys: one row per sample; dg: n rows per sample, next to each other (its
        ±β phases, `fixed_point.relax_nudged_pair`), which share the products with the keys."""
        (p0, s0), keys = aux, ctx["keys"]
        P, L, D = self.shape
        # γ scales the offsets [.., L, D], not the larger logits [.., L, L] (the free step's
        # attention keeps γ·(g·Kᵀ): evaluation, and so every recorded accuracy, is unchanged)
        dq = dg.view(-1, *self.shape) * self.gamma
        B = p0.shape[0]
        n = dq.shape[0] // B
        if n > 1:  # [B·n, P, L, D] -> [B, P, n·L, D] (a view for one sequence per sample)
            dq = dq.view(B, n, P, L, D).transpose(1, 2).reshape(B, P, n * L, D)
        if not isinstance(keys, MergedKeys):
            out = retrieval_delta(p0, s0, dq, keys)
        else:  # p0 carries the multiplicities, so the difference needs the key vectors only
            out = torch.cat([retrieval_delta(p0[r][..., :k.shape[-2]], s0[r], dq[r], k)
                             for r, k, _ in keys.chunks()])
        if n > 1:
            out = out.view(B, P, n, L, D).transpose(1, 2).reshape(B * n, P, L, D)
        return out

    def flops(self, B):
        P, L, D = self.shape
        return 2 * (2 * B * P * L * L * D)  # logits and weighted sum


class SigmaUnits:
    """A fully connected layer [B, H] with s = σ(g)."""

    def __init__(self, H, act):
        self.H, self.act, self.act_delta = H, ACTIVATIONS[act], ACTIVATION_DELTAS[act]

    def zeros(self, B, **kw):
        return torch.zeros(B, self.H, **kw)

    def update(self, g, ctx):
        return self.act(g)

    def linearise(self, g0, ctx):
        return None, self.act(g0)

    def delta(self, g0, aux, dg, ctx):
        return self.act_delta(g0, dg)

    def flops(self, B):
        return 0
