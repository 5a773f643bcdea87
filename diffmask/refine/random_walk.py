"""Random-walk propagation of class maps through a pixel affinity matrix (Ahn & Kwak, CVPR 2018).

The transition matrix is the affinity raised element-wise to ``beta`` and row-normalised,
``T = D^-1 A^beta``, so one step replaces each pixel's scores by the affinity-weighted mean of
its neighbours'; ``t`` steps give ``T^t m``. A dense ``T`` with ``t`` a power of two is raised by
log2(t) squarings (the paper's t = 256 = 2^8); a sparse ``T`` (local affinities within a radius)
is applied t times to the maps instead, which stays O(nnz * t) and never densifies.

For affinities that are local (within a radius on a grid), :func:`local_transition` and
:func:`local_random_walk` do the same walk with the transition stored as per-pixel window
weights (S, h, w), S = (2r-1)^2: one step is an unfold and a weighted sum, far faster than a
sparse matrix product on CPU and the same on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["transition_matrix", "random_walk", "local_transition", "local_random_walk"]


def transition_matrix(affinity: torch.Tensor, beta: float = 8.0) -> torch.Tensor:
    """``D^-1 A^beta`` for a dense or sparse (COO) (N, N) affinity with entries in [0, 1]."""
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity: expected a square (N, N) matrix, got shape {tuple(affinity.shape)}")
    if beta <= 0:
        raise ValueError(f"beta: expected > 0, got {beta}")
    if affinity.is_sparse:
        a = affinity.coalesce()
        values = a.values().float().clamp_min(0) ** beta
        rows = a.indices()[0]
        degree = torch.zeros(a.shape[0], device=values.device).index_add_(0, rows, values)
        if (degree <= 0).any():
            raise ValueError("affinity: a row has no positive entry (add self-affinities of 1)")
        return torch.sparse_coo_tensor(
            a.indices(), values / degree[rows], a.shape, check_invariants=False
        ).coalesce()
    a = affinity.float().clamp_min(0) ** beta
    degree = a.sum(dim=1, keepdim=True)
    if (degree <= 0).any():
        raise ValueError("affinity: a row has no positive entry (add self-affinities of 1)")
    return a / degree


def random_walk(
    class_maps: torch.Tensor,
    affinity: torch.Tensor,
    beta: float = 8.0,
    t: int = 256,
) -> torch.Tensor:
    """Propagate class maps by ``t`` random-walk steps.

    Args:
        class_maps: (K+1, H, W) class scores (background first) at the affinity's resolution.
        affinity: (N, N) with N = H*W, dense or sparse COO, entries in [0, 1] (1 = same region),
            rows in the pixel order of ``class_maps.flatten(1)``.
        beta: power applied to the affinities (8 in the paper, 16 in DiffuMask).
        t: number of steps (256 in the paper).

    Returns:
        (K+1, H, W) propagated scores (same dtype as ``class_maps``).

    Raises:
        ValueError: sizes disagree or an argument is out of range.
    """
    if class_maps.ndim != 3:
        raise ValueError(f"class_maps: expected (K+1, H, W), got shape {tuple(class_maps.shape)}")
    n = class_maps.shape[1] * class_maps.shape[2]
    if affinity.shape != (n, n):
        raise ValueError(
            f"affinity: expected ({n}, {n}) for {tuple(class_maps.shape[1:])} maps, "
            f"got {tuple(affinity.shape)}"
        )
    if int(t) != t or t < 1:
        raise ValueError(f"t: expected a positive integer, got {t}")
    trans = transition_matrix(affinity.to(class_maps.device), beta)
    vec = class_maps.flatten(1).float().T  # (N, K+1)
    if not trans.is_sparse and t & (t - 1) == 0:
        for _ in range(int(t).bit_length() - 1):  # T^(2^s) by s squarings
            trans = trans @ trans
        vec = trans @ vec
    elif trans.is_sparse and trans.device.type == "cpu":
        # scipy's CSR product is many times faster than torch's sparse CPU kernels
        import scipy.sparse

        idx = trans.indices().numpy()
        csr = scipy.sparse.csr_matrix((trans.values().numpy(), (idx[0], idx[1])), shape=trans.shape)
        out = vec.numpy()
        for _ in range(int(t)):
            out = csr @ out
        vec = torch.from_numpy(out)
    else:
        for _ in range(int(t)):
            vec = torch.sparse.mm(trans, vec) if trans.is_sparse else trans @ vec
    return vec.T.reshape(class_maps.shape).to(class_maps.dtype)


def _shift(grid: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., y, x] = grid[..., y + dy, x + dx], zero outside."""
    h, w = grid.shape[-2:]
    out = torch.zeros_like(grid)
    ys, ye = max(0, -dy), min(h, h - dy)
    xs, xe = max(0, -dx), min(w, w - dx)
    if ys < ye and xs < xe:
        out[..., ys:ye, xs:xe] = grid[..., ys + dy : ye + dy, xs + dx : xe + dx]
    return out


def local_transition(
    pair_affinity: torch.Tensor, offsets: list[tuple[int, int]], radius: int, beta: float = 8.0
) -> torch.Tensor:
    """Row-normalised local transition weights from half-plane pair affinities.

    Args:
        pair_affinity: (P, h, w): entry [p, y, x] is the affinity of (y, x) and
            (y + dy_p, x + dx_p), zero where the partner is outside the grid.
        offsets: the P half-plane offsets (dy, dx), all with |dy|, |dx| < radius.
        radius: window half-size; the window is (2*radius - 1)^2.
        beta: power applied to the affinities.

    Returns:
        (S, h, w) weights, S = (2*radius - 1)^2 in unfold order (row-major over (dy, dx)),
        with self-affinity 1 before normalisation; they sum to 1 over S at every pixel.
    """
    if beta <= 0:
        raise ValueError(f"beta: expected > 0, got {beta}")
    if pair_affinity.ndim != 3 or pair_affinity.shape[0] != len(offsets):
        raise ValueError(f"pair_affinity: expected ({len(offsets)}, h, w), got {tuple(pair_affinity.shape)}")
    size = 2 * radius - 1
    h, w = pair_affinity.shape[-2:]
    weights = torch.zeros(size * size, h, w, dtype=torch.float32, device=pair_affinity.device)
    centre = radius - 1
    weights[centre * size + centre] = 1.0
    powered = pair_affinity.float().clamp_min(0) ** beta
    for p, (dy, dx) in enumerate(offsets):
        if max(abs(dy), abs(dx)) >= radius:
            raise ValueError(f"offsets: {(dy, dx)} lies outside radius {radius}")
        weights[(centre + dy) * size + centre + dx] = powered[p]
        # the partner j = i + o sees i at offset -o with the same affinity
        weights[(centre - dy) * size + centre - dx] = _shift(powered[p], -dy, -dx)
    return weights / weights.sum(dim=0, keepdim=True)


def local_random_walk(
    class_maps: torch.Tensor, weights: torch.Tensor, t: int = 256, backend: str = "auto"
) -> torch.Tensor:
    """``t`` random-walk steps with local transition weights from :func:`local_transition`.

    Args:
        class_maps: (C, h, w) scores.
        weights: (S, h, w) window weights, S = (2r-1)^2.
        t: number of steps.
        backend: ``"unfold"`` (torch, any device), ``"scipy"`` (CPU CSR product), or ``"auto"``
            (scipy on CPU, where unfold is much slower: experiments/history/settings.md;
            unfold elsewhere).

    Returns:
        (C, h, w) propagated scores.
    """
    s = weights.shape[0]
    size = int(round(s**0.5))
    if size * size != s or size % 2 == 0:
        raise ValueError(f"weights: expected (S, h, w) with S an odd square, got {tuple(weights.shape)}")
    if class_maps.ndim != 3 or class_maps.shape[-2:] != weights.shape[-2:]:
        raise ValueError(
            f"class_maps: expected (C, {weights.shape[1]}, {weights.shape[2]}), got {tuple(class_maps.shape)}"
        )
    if int(t) != t or t < 1:
        raise ValueError(f"t: expected a positive integer, got {t}")
    if backend not in ("auto", "unfold", "scipy"):
        raise ValueError(f"backend: expected 'auto', 'unfold' or 'scipy', got {backend!r}")
    c, h, w = class_maps.shape
    if backend == "scipy" or (backend == "auto" and weights.device.type == "cpu"):
        return _local_walk_scipy(class_maps, weights, size, int(t))
    flat_w = weights.reshape(1, s, h * w)
    maps = class_maps.float()[None]
    for _ in range(int(t)):
        cols = F.unfold(maps, kernel_size=size, padding=size // 2).view(c, s, h * w)
        maps = (cols * flat_w).sum(dim=1).view(1, c, h, w)
    return maps[0].to(class_maps.dtype)


def _local_walk_scipy(class_maps: torch.Tensor, weights: torch.Tensor, size: int, t: int) -> torch.Tensor:
    # on CPU, unfold over an 81-wide window is slow; a CSR matrix of the same weights is not
    import numpy as np
    import scipy.sparse

    c, h, w = class_maps.shape
    half = size // 2
    ys, xs = np.mgrid[:h, :w]
    rows, cols, vals = [], [], []
    wts = weights.detach().cpu().numpy()
    for k in range(size * size):
        dy, dx = k // size - half, k % size - half
        ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        rows.append((ys * w + xs)[ok])
        cols.append(((ys + dy) * w + xs + dx)[ok])
        vals.append(wts[k][ok])
    csr = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w)
    )
    csr.eliminate_zeros()
    vec = class_maps.detach().float().reshape(c, h * w).cpu().numpy().T
    for _ in range(t):
        vec = csr @ vec
    out = torch.from_numpy(np.ascontiguousarray(vec.T)).reshape(c, h, w)
    return out.to(class_maps.device, class_maps.dtype)
