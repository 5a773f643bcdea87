"""random_walk and its local (windowed) form."""

from __future__ import annotations

import pytest
import torch

from diffmask.refine import local_random_walk, local_transition, random_walk


def test_identity_affinity_is_a_no_op():
    maps = torch.rand(3, 6, 5)
    eye = torch.eye(30)
    torch.testing.assert_close(random_walk(maps, eye, beta=8, t=256), maps)
    torch.testing.assert_close(random_walk(maps, eye.to_sparse(), beta=8, t=7), maps)
    torch.testing.assert_close(random_walk(maps, eye, beta=8, t=5), maps)


def test_walk_averages_within_connected_regions():
    # two regions (left/right columns) fully connected inside, disconnected across
    maps = torch.rand(2, 4, 4)
    region = torch.arange(16) % 4 < 2
    aff = (region[:, None] == region[None, :]).float()
    out = random_walk(maps, aff, beta=8, t=256)
    for r in (region, ~region):
        cells = out.flatten(1)[:, r]
        torch.testing.assert_close(cells, maps.flatten(1)[:, r].mean(dim=1, keepdim=True).expand_as(cells))


def test_local_form_matches_the_matrix_form():
    torch.manual_seed(0)
    h, w, radius = 7, 6, 3
    offsets = [
        (dy, dx)
        for dy in range(radius)
        for dx in range(-radius + 1, radius)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius
    ]
    pair = torch.rand(len(offsets), h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dense = torch.eye(h * w)
    for p, (dy, dx) in enumerate(offsets):
        ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        pair[p][~ok] = 0
        i = (ys * w + xs)[ok]
        j = ((ys + dy) * w + xs + dx)[ok]
        dense[i, j] = pair[p][ok]
        dense[j, i] = pair[p][ok]
    maps = torch.rand(3, h, w)
    expected = random_walk(maps, dense, beta=2, t=16)
    weights = local_transition(pair, offsets, radius, beta=2)
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(h, w))
    for backend in ("unfold", "scipy"):
        torch.testing.assert_close(
            local_random_walk(maps, weights, t=16, backend=backend), expected, atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(
        random_walk(maps, dense.to_sparse(), beta=2, t=16), expected, atol=1e-5, rtol=1e-4
    )


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="affinity"):
        random_walk(torch.rand(2, 3, 3), torch.eye(8))
    with pytest.raises(ValueError, match="no positive entry"):
        random_walk(torch.rand(2, 2, 2), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="beta"):
        random_walk(torch.rand(2, 2, 2), torch.eye(4), beta=0)
    with pytest.raises(ValueError, match="backend"):
        local_random_walk(torch.rand(2, 2, 2), torch.ones(9, 2, 2), backend="cuda")
