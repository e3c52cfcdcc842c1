"""The GDU gradient check (docs/method.md §3): EP's per-step updates against BPTT's per-step gradients.

Theorem (Ernoult et al., NeurIPS 2019): once the free phase sits at its fixed point s⁰, the EP
increment of the k-th nudged step equals, as β → 0, minus the BPTT gradient contributed by the
k-th-to-last step of the free phase, for parameters and neurons alike. This module computes both
sides on a batch, scores them per layer, plots them, and traces the free-phase convergence the
theorem depends on.

Sign convention, used everywhere below (results, metrics, plots): every curve is an estimate of
**−∂ℓ/∂θ** (the descent direction). EP increments are taken as they are,
`[∂Φ/∂θ(s_{k}) − ∂Φ/∂θ(s_{k−1})]/β`; BPTT per-step gradients are negated.

Neurons. The dynamics is s_{t+1} = σ(g_t) with g_t = ∂Φ/∂s(s_t) (σ: the activation, or the
Hopfield retrieval for the projection layers). Linearised at the fixed point, the k-th EP state
increment is σ'·(Jσ')^{k−1}·(−∂ℓ/∂s_T) while ∂ℓ/∂s_{T−k+1} = (Jσ')^{k−1}·∂ℓ/∂s_T: the two differ
by the activation's Jacobian σ' (a diagonal, or for the Hopfield retrieval a symmetric
γ·Vᵀ(diag a − aaᵀ)V block), so the BPTT quantity that EP's neuron increments match is the
gradient with respect to the pre-activation, ∂ℓ/∂g_{T−k} = σ'ᵀ ∂ℓ/∂s_{T−k+1} (it is also zero
exactly where EP's increment is: at saturated units). It is taken per sample (B·∂ℓ/∂g, since ℓ
is a batch mean while EP's state increments are per sample). The plain state gradients
−B·∂ℓ/∂s_t are kept in the result too (`bptt_state_grads`). Parameters need no such care: the
Hebbian term ∂Φ/∂θ is batch-averaged exactly like ℓ.
"""
import copy
import math
import os

import torch

import devices
import fixed_point
import model_utils as mu
from data_io import save_json

SIGN_LABEL = "−∂ℓ/∂θ  (EP: Σ ΔΦ_θ/β as is, BPTT: −Σ ∂ℓ/∂θ_t)"

# The EP curves the check can draw, one per estimator of model_utils.ESTIMATORS: the key of its
# per-step increments in a result, its metric suffix and its plot label.
CURVES = {"one-sided": ("ep_pos", "one_sided", "EP +β (one-sided)"),
          "one-sided-negative": ("ep_neg", "one_sided_negative", "EP −β (one-sided)"),
          "symmetric": ("ep_sym", "symmetric", "EP ±β (symmetric)")}
PHASE_CURVE = {1: "one-sided", -1: "one-sided-negative"}  # the curve of a single nudged phase
SHORT = {"one-sided": "+β", "one-sided-negative": "−β", "symmetric": "sym"}  # table and plot titles


def curves_in(result):
    """The estimator names whose curves a result (or its metrics' layer dict) holds, in CURVES order."""
    return [e for e, (key, suffix, _) in CURVES.items()
            if key in result or f"rel_rmse_{suffix}" in result]


# ----------------------------------------------------------------------------- naming
def neuron_names(model):
    """Names of the neuron layers, aligned with `model.init_states`: s0_projection, s1, s2, …"""
    return ["s0_projection"] + [f"s{k}" for k in range(1, len(model.fc_layers) + 1)]


# ----------------------------------------------------------------------------- the check
def plain_copy(model, dtype=None):
    """A deep copy (in `dtype` if given) that takes the plain, uncompiled steps over all L keys:
    compiled steps belong to the original's bound methods and dtype, and the theorem is about
    the steps as written (merged keys give the same dynamics, but the check shows the plain ones)."""
    compiled, model.compiled = model.compiled, {}
    try:
        new = copy.deepcopy(model)
    finally:
        model.compiled = compiled
    new.merge_keys = False
    return new if dtype is None else new.to(dtype)


def _free_phase_with_graph(model, x, y, T, K, entries=None):
    """T−K free steps without a graph, then K recorded steps; one backward of ℓ(s_T) through
    them gives ∂ℓ/∂g_t and ∂ℓ/∂s_{t+1} of every recorded step (linear in K, no parameter copies).
    Per-step parameter gradients follow from the pre-activation gradients δ_t = ∂ℓ/∂g_t: θ enters
    step t only through g_t = ∂Φ/∂s(s_t; θ), and Φ is at most bilinear in the states, so
    ∂ℓ/∂θ_t = (∂g_t/∂θ)ᵀ δ_t = B·[∂Φ/∂θ(s_t + δ_t) − ∂Φ/∂θ(s_t − δ_t)]/2 (batch-averaged ∂Φ/∂θ,
    exact: the central difference of a quadratic). `entries`: per parameter, a flat index of the
    entries to keep (None: all). Returns s⁰ = s_T (detached), and, ordered from the last step
    backwards ([K, *shape] each), the per-step −∂ℓ/∂θ_t, −B·∂ℓ/∂g_t and −B·∂ℓ/∂s_{t+1}
    (t = T−1 … T−K)."""
    B = x.shape[0]
    s, drive, keys = mu.steps_before_window(model, x, T, K)  # the model's parameters need no graph here
    inputs, pre, state = [], [], []  # per recorded step: s_t, g_t, s_{t+1}
    with torch.enable_grad():
        s = [t.detach().requires_grad_(True) for t in s]
        for _ in range(K):
            inputs.append([t.detach() for t in s])
            g = model.grad_states(s, drive)  # pre-activations g_t = ∂Φ/∂s(s_t)
            s = model.update(g, keys)
            pre.append(g)
            state.append(s)
        mu.check_finite(s, "GDU free")
        loss = mu.mse_loss(s[-1], y)
        flat = [v for group in (pre, state) for step in group for v in step]
        grads = list(torch.autograd.grad(loss, flat, allow_unused=True))
    s0 = [t.detach() for t in s]
    del pre, state, flat, s, loss  # frees the graph
    grads = [torch.zeros_like(v) if gr is None else gr  # None: the tensor does not reach ℓ
             for v, gr in zip([v for step in inputs for v in step] * 2, grads)]
    n = len(inputs[0])  # neuron layers
    delta = [grads[t * n:(t + 1) * n] for t in range(K)]
    dstate = [grads[(K + t) * n:(K + t + 1) * n] for t in range(K)]
    del grads
    entries = entries or [None] * len(model.params())
    theta = _param_curves(model, entries, K, x)
    for t in range(K):
        s_t, d_t = inputs[t], delta[t]
        plus, minus = [a + b for a, b in zip(s_t, d_t)], [a - b for a, b in zip(s_t, d_t)]
        for out, h, e in zip(theta, model.hebbian(x, plus, minus), entries):
            out[K - 1 - t] = _take(h, e).mul_(-B / 2)
    stack = lambda per_step: [torch.stack([per_step[K - 1 - k][i] for k in range(K)]) for i in range(n)]
    return s0, theta, [c.mul_(-float(B)) for c in stack(delta)], [c.mul_(-float(B)) for c in stack(dstate)]


def _take(v, entries):
    """The chosen flat entries of v (all of v when entries is None)."""
    return v if entries is None else v.flatten()[entries]


def _param_curves(model, entries, K, like):
    """Per-step buffers [K, *followed shape] for every parameter, in like's dtype and device."""
    return [torch.zeros(K, *(p.shape if e is None else e.shape), dtype=like.dtype, device=like.device)
            for p, e in zip(model.params(), entries)]


@torch.no_grad()
def _nudged_increments(model, x, y, s0, K, beta, entries=None):
    """From s⁰, K nudged steps with β: per-step EP increments of every parameter,
    [∂Φ/∂θ(s_{k}) − ∂Φ/∂θ(s_{k−1})]/β, and of every neuron layer, (s_k − s_{k−1})/β."""
    drive, keys = model.precompute(x)
    entries = entries or [None] * len(model.params())
    s = s0
    dtheta = _param_curves(model, entries, K, s0[0])
    dstate = [torch.empty(K, *v.shape, dtype=v.dtype, device=v.device) for v in s0]
    for k in range(K):
        new = model.step(s, drive, keys, beta, y)
        for out, h, e in zip(dtheta, model.hebbian(x, new, s), entries):  # ∂Φ/∂θ(s_k) − ∂Φ/∂θ(s_{k−1})
            out[k] = _take(h, e).div_(beta)
        for out, a, b in zip(dstate, new, s):
            torch.sub(a, b, out=out[k]).div_(beta)
        s = new
    mu.check_finite(s, f"GDU nudged (beta={beta:g})")
    return dtheta, dstate


def gdu_check(model, x, y, T, K, beta, estimator="symmetric", dtype=torch.float64, max_entries=None, seed=0):
    """Per-step EP increments and BPTT gradients over K steps, all as estimates of −∂ℓ/∂θ
    (docs/method.md §3), computed in `dtype` on a deep copy of the model.

    Free phase: T steps at β = 0 from zero (the last K of them recorded for BPTT) → s⁰.
    EP: K nudged steps from s⁰ for each nudged phase of the estimator (an ESTIMATORS name, or
    the original's thirdphase boolean): +β and/or −β, each a one-sided curve; the symmetric
    estimate is their average (in general (a·EP_a − b·EP_b)/(a − b) for the pair (a, b)).
    BPTT: ℓ = mse_loss(s_T), one backward through the K recorded steps, each step with its own
    parameter copy, so per-step contributions come out in time and memory linear in K.
    Index k = 0 … K−1 of every curve is nudged step k+1 ↔ the (k+1)-th-to-last free step.

    Returns a dict: names, kinds ('param'|'neuron'), ep_pos / ep_neg / ep_sym / bptt
    ({name: [K, *shape] per-step increments}, those the estimator runs; neurons keep the batch
    axis), estimator, bptt_state_grads
    ({neuron name: −B·∂ℓ/∂s_t for t = T … T−K+1, [K, B, …]}), free_residual (one more free step
    at s⁰: max over layers of ‖Δs‖∞/‖s‖∞, as relax's tol; the theorem needs it ≪ β), T, K, beta,
    betas ([0, β]: free and nudged phase), thirdphase (estimator is symmetric), dtype, batch_size.

    max_entries: follow at most this many entries of each parameter tensor (a fixed random
    subset drawn with `seed`; result["entries"] holds their flat indices, result["shapes"] the
    full shapes); the metrics are then estimates over that subset. None: every entry.

    Cost (what `--check-thm` pays per call): T + K steps (T + 2K symmetric), one backward
    through K steps and 4K Hebbian terms, in `dtype` — about two EP training steps. Memory: the
    stored per-step curves, (2 + 2·symmetric)·K numbers per followed parameter entry, plus
    O(K·|s|) for the states of the backward (no per-step parameter copies).
    """
    if not 0 < K <= T:
        raise ValueError(f"the GDU check needs 0 < K <= T, got T={T}, K={K}")
    if beta == 0:
        raise ValueError("the GDU check needs a nonzero beta")
    est = mu.estimator_name(estimator)
    dtype = devices.DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = plain_copy(model, dtype)  # the theorem is about the plain synchronous steps
    model.requires_grad_(False)
    device = next(model.parameters()).device
    x, y = x.to(device=device, dtype=dtype), y.to(device)

    entries = _followed_entries(model, max_entries, seed, device)
    s0, bptt_theta, bptt_pre, bptt_state = _free_phase_with_graph(model, x, y, T, K, entries)
    with torch.no_grad():
        drive, keys = model.precompute(x)
        residual = fixed_point.relative_change(model.step(s0, drive, keys), s0)
    pnames, snames = model.param_names(), neuron_names(model)
    names = pnames + snames
    as_dict = lambda theta, state: {n: v.cpu() for n, v in zip(names, list(theta) + list(state))}
    result = {
        "names": names, "kinds": ["param"] * len(pnames) + ["neuron"] * len(snames),
        "bptt": as_dict(bptt_theta, bptt_pre),
        "bptt_state_grads": {n: v.cpu() for n, v in zip(snames, bptt_state)},
        "entries": {n: e.cpu() for n, e in zip(pnames, entries) if e is not None},
        "shapes": {n: tuple(p.shape) for n, p in zip(pnames, model.params())},
        "free_residual": residual, "T": int(T), "K": int(K), "beta": float(beta),
        "betas": [0.0, float(beta)], "estimator": est, "thirdphase": est == "symmetric",
        "dtype": str(dtype).replace("torch.", ""), "batch_size": int(x.shape[0]),
    }
    result.update(_ep_curves(model, x, y, s0, K, beta, est, entries, as_dict))
    return result


def _followed_entries(model, max_entries, seed, device):
    """Per parameter, the flat indices of at most max_entries entries (a fixed random subset
    drawn with seed), or None to follow all of them."""
    gen = torch.Generator().manual_seed(seed)
    return [None if max_entries is None or p.numel() <= max_entries else
            torch.randperm(p.numel(), generator=gen)[:max_entries].sort().values.to(device)
            for p in model.params()]


def _ep_curves(model, x, y, s0, K, beta, est, entries, as_dict):
    """The EP curves of estimator `est`: one per nudged phase it runs (+β: ep_pos, −β: ep_neg),
    and a two-phase estimator's own, (a·EP_a − b·EP_b)/(a − b) for its pair (a, b)."""
    a, b = mu.ESTIMATORS[est]
    out = {CURVES[PHASE_CURVE[sg]][0]: as_dict(*_nudged_increments(model, x, y, s0, K, sg * beta, entries))
           for sg in (a, b) if sg}
    key = CURVES[est][0]
    if key not in out:
        ea, eb = out[CURVES[PHASE_CURVE[a]][0]], out[CURVES[PHASE_CURVE[b]][0]]
        out[key] = {n: (a * ea[n] - b * eb[n]) / (a - b) for n in ea}
    return out


# ----------------------------------------------------------------------------- metrics
def _cumulative_norms(a, b):
    """(‖A − B‖, ‖A‖, ‖B‖) over the cumulative curves A, B of per-step increments [K, …],
    accumulated step by step so that no [K, …] temporary is made."""
    ca, cb = torch.zeros_like(a[0]), torch.zeros_like(b[0])
    d2 = a2 = b2 = 0.0
    for ak, bk in zip(a, b):
        ca += ak
        cb += bk
        d2 += (ca - cb).pow(2).sum().item()
        a2 += ca.pow(2).sum().item()
        b2 += cb.pow(2).sum().item()
    return math.sqrt(d2), math.sqrt(a2), math.sqrt(b2)


def _distance(a, b):
    """‖A − B‖ between the cumulative curves of two per-step increment tensors [K, …]."""
    return _cumulative_norms(a, b)[0]


def rel_rmse(ep, bptt):
    """‖EP − BPTT‖ / max(‖EP‖, ‖BPTT‖) over the cumulative curves (all steps and entries);
    0 when both curves are identically zero."""
    d, na, nb = _cumulative_norms(ep, bptt)
    return d / max(na, nb) if max(na, nb) > 0 else 0.0


def sign_agreement(ep, bptt):
    """Fraction of entries of the cumulative estimate after K steps with sign(EP) = sign(BPTT);
    entries that are exactly zero on both sides (saturated units) agree."""
    return (torch.sign(ep.sum(0)) == torch.sign(bptt.sum(0))).double().mean().item()


def gdu_metrics(result):
    """Per-layer scores of a `gdu_check` result, shaped {"layers": {name: {rel_rmse_<curve>, …,
    sign_agreement_<curve>, …}}, "T", "K", "betas", "estimator"} for each EP curve it holds
    (`CURVES`: one_sided = +β, one_sided_negative = −β, symmetric)."""
    layers, present = {}, curves_in(result)
    for name in result["names"]:
        bptt, m = result["bptt"][name], {}
        for kind in ("rel_rmse", "sign_agreement"):
            for e in present:
                key, suffix, _ = CURVES[e]
                m[f"{kind}_{suffix}"] = (rel_rmse if kind == "rel_rmse" else sign_agreement)(result[key][name], bptt)
        if name in result.get("entries", {}):
            m["entries_followed"] = len(result["entries"][name])
        layers[name] = m
    return {"layers": layers, "T": result["T"], "K": result["K"], "betas": list(result["betas"]),
            "estimator": result["estimator"]}


def symmetric_gain(result, name):
    """distance(symmetric EP, BPTT) / mean(distance(+β EP, BPTT), distance(−β EP, BPTT)):
    below 1 when the third phase helps (nan when the one-sided estimates are exact)."""
    bptt = result["bptt"][name]
    one_sided = (_distance(result["ep_pos"][name], bptt) +
                 _distance(result["ep_neg"][name], bptt)) / 2
    sym = _distance(result["ep_sym"][name], bptt)
    return sym / one_sided if one_sided > 0 else float("nan")


def format_table(metrics):
    """A per-layer text table of `gdu_metrics` output."""
    present = curves_in(next(iter(metrics["layers"].values())))
    width = max([len("layer")] + [len(n) for n in metrics["layers"]])
    cols, keys = [], []
    for e in present:
        cols += [f"relRMSE {SHORT[e]}", f"sign {SHORT[e]}"]
        keys += [f"rel_rmse_{CURVES[e][1]}", f"sign_agreement_{CURVES[e][1]}"]
    head = (f"GDU check (EP vs BPTT, cumulative over K={metrics['K']} steps, T={metrics['T']}, "
            f"betas={metrics['betas']}; +β, −β: one-sided, sym: symmetric)")
    lines = [head, f"{'layer':<{width}}  " + "  ".join(f"{c:>15}" for c in cols)]
    for name, m in metrics["layers"].items():
        cells = []
        for key in keys:
            v = m[key]
            cells.append(f"{v:>15.3e}" if key.startswith("rel") else f"{v:>15.1%}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def _figure(**kw):
    """A matplotlib Figure on the Agg canvas, without touching pyplot's global backend."""
    from matplotlib.figure import Figure
    return Figure(**kw)


def _curves(result, name, index):
    """Cumulative curves of one entry (flat index), from 0 at k = 0: {label: [K + 1 values]}."""
    out = {}
    series = [(key, label) for key, _, label in CURVES.values()] + [("bptt", "BPTT")]
    for key, label in series:
        if key in result:
            v = result[key][name].flatten(1)[:, index].cumsum(0)
            out[label] = torch.cat([v.new_zeros(1), v]).tolist()
    return out


_STYLE = {"EP +β (one-sided)": dict(color="tab:orange", ls="--", lw=1.2),
          "EP −β (one-sided)": dict(color="tab:green", ls="--", lw=1.2),
          "EP ±β (symmetric)": dict(color="tab:blue", lw=2.0),
          "BPTT": dict(color="black", ls=":", lw=2.0, marker=".", ms=4)}


def _draw_entry(ax, result, name, index):
    for label, values in _curves(result, name, index).items():
        ax.plot(range(len(values)), values, label=label, **_STYLE[label])
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)


def _pick_entries(result, name, n, seed):
    """n random entries, drawn among those whose BPTT estimate is not zero when possible."""
    final = result["bptt"][name].sum(0).flatten()
    live = torch.nonzero(final != 0).flatten()
    pool = live if len(live) >= min(n, final.numel()) else torch.arange(final.numel())
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values.tolist()


def _savefig(fig, path):
    fig.savefig(path, dpi=110)
    return path


def plot_gdu(result, out_dir, n_entries=5, seed=0):
    """PNGs of a `gdu_check` result in out_dir: per parameter tensor, n random entries'
    cumulative EP and BPTT curves (gdu_<name>.png); a bar chart of the symmetric gain
    (gdu_symmetric_gain.png, with thirdphase) or of the one-sided relative RMSE; a one-page
    summary of all layers (gdu_summary.png). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    metrics, paths = gdu_metrics(result), []
    tag = f"T={result['T']}, K={result['K']}, β={result['beta']:g}, {result['dtype']}"
    for name, kind in zip(result["names"], result["kinds"]):
        if kind != "param":
            continue
        entries = _pick_entries(result, name, n_entries, seed)
        shape = tuple(result.get("shapes", {}).get(name, result["bptt"][name].shape[1:]))
        chosen = result.get("entries", {}).get(name)  # a followed subset: map back to the tensor
        fig = _figure(figsize=(3.2 * len(entries), 3.4), constrained_layout=True)
        axes = fig.subplots(1, len(entries), squeeze=False)[0]
        for ax, idx in zip(axes, entries):
            _draw_entry(ax, result, name, idx)
            flat = idx if chosen is None else int(chosen[idx])
            ax.set_title(f"{name}{list(_unravel(flat, shape))}", fontsize=9)
            ax.set_xlabel("nudged step k  (↔ k-th-to-last free step)")
        axes[0].set_ylabel("cumulative estimate of −∂ℓ/∂θ")
        axes[0].legend(fontsize=7)
        m = metrics["layers"][name]
        scores = "rel. RMSE " + ", ".join(f"{e} {m['rel_rmse_' + CURVES[e][1]]:.2e}" for e in curves_in(result))
        fig.suptitle(f"GDU check, {name} ({tag}); sign convention {SIGN_LABEL}; {scores}",
                     fontsize=9)
        paths.append(_savefig(fig, os.path.join(out_dir, f"gdu_{_safe(name)}.png")))
    paths.append(_savefig(_bar_figure(result, metrics, tag), os.path.join(
        out_dir, "gdu_symmetric_gain.png" if result["thirdphase"] else "gdu_rel_rmse.png")))
    paths.append(_savefig(_summary_figure(result, metrics, tag),
                          os.path.join(out_dir, "gdu_summary.png")))
    return paths


def _unravel(index, shape):
    out = []
    for n in reversed(shape):
        out.append(index % n)
        index //= n
    return tuple(reversed(out))


def _safe(name):
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _draw_bars(ax, result, metrics):
    names = result["names"]
    if result["thirdphase"]:
        values = [symmetric_gain(result, n) for n in names]
        ax.axhline(1.0, color="tab:red", lw=1, ls="--")
        ax.set_ylabel("dist(sym. EP, BPTT) / mean dist(±β one-sided EP, BPTT)", fontsize=8)
    else:
        est = result["estimator"]
        values = [metrics["layers"][n]["rel_rmse_" + CURVES[est][1]] for n in names]
        ax.set_ylabel(f"rel. RMSE ({est} EP, BPTT)", fontsize=8)
    colors = ["tab:blue" if k == "param" else "tab:gray" for k in result["kinds"]]
    heights = [v if math.isfinite(v) and v > 0 else 0.0 for v in values]  # nan/0: no bar
    ax.bar(range(len(names)), heights, color=colors)
    if any(heights):
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)


def _bar_figure(result, metrics, tag):
    fig = _figure(figsize=(max(6, 0.7 * len(result["names"]) + 2), 4.5), constrained_layout=True)
    ax = fig.subplots()
    _draw_bars(ax, result, metrics)
    ax.set_title(("Symmetric vs one-sided EP, distance to BPTT (below 1: third phase helps)"
                  if result["thirdphase"] else f"{result['estimator']} EP vs BPTT") +
                 f"\nparameters blue, neurons grey; {tag}", fontsize=9)
    return fig


def _summary_figure(result, metrics, tag):
    """One page: per layer, the entry with the largest cumulative BPTT estimate, + the bars."""
    names = result["names"]
    ncols = 4
    nrows = (len(names) + 1 + ncols - 1) // ncols
    fig = _figure(figsize=(4 * ncols, 3.1 * nrows), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        final = result["bptt"][name].sum(0).flatten().abs()
        idx = int(final.argmax())
        _draw_entry(ax, result, name, idx)
        m = metrics["layers"][name]
        text = ", ".join(f"{SHORT[e]} {m['rel_rmse_' + CURVES[e][1]]:.1e}/"
                         f"{m['sign_agreement_' + CURVES[e][1]]:.0%}" for e in curves_in(result))
        entry = list(_unravel(idx, tuple(result["bptt"][name].shape[1:])))
        ax.set_title(f"{name}{entry}\nrelRMSE/sign: {text}", fontsize=8)
        ax.set_xlabel("nudged step k", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("cumulative −∂ℓ/∂θ (neurons: −B·∂ℓ/∂g)", fontsize=8)
    axes[0].legend(fontsize=6)
    _draw_bars(axes[len(names)], result, metrics)
    axes[len(names)].set_title("symmetric gain" if result["thirdphase"] else "rel. RMSE",
                               fontsize=9)
    for ax in axes[len(names) + 1:]:
        ax.set_visible(False)
    fig.suptitle(f"GDU check summary ({tag}, batch {result['batch_size']}, free-phase relative change "
                 f"{result['free_residual']:.1e}); sign convention {SIGN_LABEL}", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- convergence
@torch.no_grad()
def convergence_trace(model, x, T, dtype=None):
    """Free phase (β = 0, from zero) diagnostics per step t = 1 … T: rel = the tool's one
    convergence measure, `relative_change(s_t, s_{t−1})` (largest relative change of any layer,
    as --tol uses it), delta = ‖s_t − s_{t−1}‖∞ over all layers, phi = mean Φ(s_t) of the batch."""
    if dtype is not None:  # a copy only to change dtype; model.step below is the plain step anyway
        model = plain_copy(model, devices.DTYPES[dtype] if isinstance(dtype, str) else dtype)
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    drive, keys = model.precompute(x)
    s = model.init_states(x.shape[0], x.device, x.dtype)
    delta, rel, phi = [], [], []
    for _ in range(T):
        new = model.step(s, drive, keys)
        delta.append(max((a - b).abs().max().item() for a, b in zip(new, s)))
        rel.append(fixed_point.relative_change(new, s))
        phi.append(model.phi(x, new).mean().item())
        s = new
    return {"delta": delta, "rel": rel, "phi": phi, "T": int(T)}


FIXED_POINT_TOL = 1e-6  # relative change per step below which the check treats s_T as a fixed point
SMALL_BETA = 0.1        # EP's side is a finite difference in β: its bias grows with β


def format_convergence(trace, tol=FIXED_POINT_TOL):
    """One line summarising a `convergence_trace` in the tool's one convergence measure."""
    rel, T = trace["rel"], trace["T"]
    if T == 0:
        return "free phase: T = 0 steps, nothing to trace"
    below = next((t + 1 for t, r in enumerate(rel) if r < tol), None)
    return (f"free phase over T={T} steps: relative change per step (largest over layers, as --tol) "
            f"first {rel[0]:.1e}, last {rel[-1]:.1e}, "
            + (f"below {tol:g} from step {below}" if below is not None else f"never below {tol:g}")
            + f"; mean phi {trace['phi'][-1]:.6g}")


def format_conditions(result):
    """Two lines: do the theorem's conditions hold here (a fixed point, a small β), and if not,
    what to change. The measured distances are only expected to be small when both hold."""
    res, beta, T = result["free_residual"], result["beta"], result["T"]
    fixed, small = res < FIXED_POINT_TOL, abs(beta) <= SMALL_BETA
    first = (f"GDU conditions: free phase at a fixed point: {'yes' if fixed else 'NO'} (relative change "
             f"{res:.1e} after T={T} steps, wanted < {FIXED_POINT_TOL:g})"
             + ("" if fixed else ": raise --T"))
    second = (f"                small beta: {'yes' if small else 'NO'} (beta = {beta:g}, wanted <= {SMALL_BETA:g})"
              + ("" if small else ": EP's side is a finite difference in beta, biased by it; "
                 "use e.g. --betas 0 0.01 for the check"))
    if not (fixed and small):
        second += ". Until both hold, large distances to BPTT are expected."
    return first + "\n" + second


def plot_convergence(trace, path):
    """Two panels: ‖s_t − s_{t−1}‖ (log scale) and mean Φ(s_t) against the free step t."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig = _figure(figsize=(10, 3.6), constrained_layout=True)
    ax1, ax2 = fig.subplots(1, 2)
    steps = range(1, trace["T"] + 1)
    positive = lambda v: [u if u > 0 else float("nan") for u in v]  # exact zeros: no point
    ax1.semilogy(steps, positive(trace["delta"]), label="max ‖s_t − s_{t−1}‖∞")
    ax1.semilogy(steps, positive(trace["rel"]), label="relative change (as --tol)")
    ax1.set_xlabel("free step t")
    ax1.set_ylabel("state change")
    ax1.legend(fontsize=8)
    ax2.plot(steps, trace["phi"])
    ax2.set_xlabel("free step t")
    ax2.set_ylabel("mean Φ(x, s_t) over the batch")
    fig.suptitle("Free-phase convergence (β = 0): GDU needs a fixed point", fontsize=10)
    return _savefig(fig, path)


# ----------------------------------------------------------------------------- entry points
def run_gducheck(model, x, y, args, out_dir, log=print):
    """`--execute gducheck` on an embedded batch: convergence summary and per-layer table to
    `log`, gdu_metrics.json in out_dir, and with args.save the PNGs (+ convergence.png).
    Reads args.T, args.K, args.betas (β2 is the nudging strength; the free phase runs at
    β = 0), args.estimator (or the original's args.thirdphase), args.gdu_dtype, args.save.
    Returns the metrics dict."""
    dtype = getattr(args, "gdu_dtype", "float64")
    beta1, beta2 = args.betas
    if beta1 != 0:
        log(f"note: the GDU check runs its free phase at beta = 0 (--betas gives {beta1:g})")
    os.makedirs(out_dir, exist_ok=True)
    trace = convergence_trace(model, x, args.T, dtype=dtype)
    log(format_convergence(trace))
    result = gdu_check(model, x, y, args.T, args.K, beta2, estimator_of(args), dtype,
                       max_entries_of(args))
    if result["entries"]:
        log("GDU check follows a random subset of the largest tensors: " + ", ".join(
            f"{n} {len(e):,} of {math.prod(result['shapes'][n]):,} entries" for n, e in result["entries"].items()))
    metrics = gdu_metrics(result)
    log(format_table(metrics))
    log(format_conditions(result))
    path = os.path.join(out_dir, "gdu_metrics.json")
    save_json(metrics, path)
    log(f"GDU metrics written to {path}")
    if getattr(args, "save", False):
        paths = plot_gdu(result, out_dir)
        paths.append(plot_convergence(trace, os.path.join(out_dir, "convergence.png")))
        log(f"GDU plots written to {out_dir}: " + ", ".join(os.path.basename(p) for p in paths))
    return metrics


def estimator_of(args):
    """The EP estimator the flags name: --estimator, or the original's --thirdphase."""
    return getattr(args, "estimator", None) or mu.estimator_name(bool(getattr(args, "thirdphase", False)))


def max_entries_of(args):
    n = getattr(args, "gdu_max_entries", 0)
    if n is not None and n < 0:
        raise ValueError(f"--gdu-max-entries must be >= 0 (0 = all), got {n}")
    return n or None


def add_gdu_args(parser):
    """The GDU check's flags: --gdu-dtype (float64 default) and --gdu-samples (16)."""
    parser.add_argument("--gdu-dtype", choices=sorted(devices.DTYPES), default="float64",
                        help="precision of the GDU check (EP is a finite difference in beta: "
                             "float32 loses the small-gradient layers)")
    parser.add_argument("--gdu-samples", type=int, default=16,
                        help="number of test samples the GDU check runs on")
    parser.add_argument("--gdu-max-entries", type=int, default=1_000_000,
                        help="follow at most this many (random, fixed) entries of each parameter "
                             "tensor, which bounds memory on big layers; 0 = all (default 1000000)")
    return parser
