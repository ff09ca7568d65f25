"""FramePack's sampler written out from its equations, as the reference the product's sampler must reproduce.

FramePack integrates the flow ODE as x = x0 + sigma * v: data prediction, alpha = 1, lambda = -log(sigma),
UniPC with B(h) = h ("bh1"), order min(3, steps - 1) reached one step at a time, the corrector applied after
every model call, and the x0 prediction at the last nonzero sigma returned.
"""

import math

import torch


def _phi_coefficients(h: float, order: int) -> list[float]:
    """b_k = phi_k(h) * k! / B(h) for k = 1..order, with phi_1(h) h = e^-h - 1 (data prediction: step -h)."""
    step = -h
    phi = math.expm1(step) / step - 1
    factorial, values = 1, []
    for k in range(1, order + 1):
        values.append(phi * factorial / step)
        factorial *= k + 1
        phi = phi / step - 1 / factorial
    return values


def _solve(ratios: list[float], rhs: list[float]) -> list[float]:
    """The Vandermonde system sum_j ratios[j]^i x_j = rhs[i], i = 0..n-1."""
    n = len(rhs)
    matrix = torch.tensor([[r**i for r in ratios] for i in range(n)], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(rhs, dtype=torch.float64)).tolist()


def framepack_unipc(model, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """`model(x, sigma) -> x0`; returns the x0 prediction after len(sigmas) - 1 model calls."""
    sigmas = sigmas.double()
    max_order = min(3, len(sigmas) - 2)
    x = noise.double()
    points = [(sigmas[0].item(), model(x, sigmas[0]).double())]  # (sigma, x0) of every model call, newest last
    for index in range(1, len(sigmas) - 1):
        order = min(index, max_order)
        sigma = sigmas[index].item()
        sigma_0, x0_0 = points[-1]
        h = math.log(sigma_0) - math.log(sigma)
        ratios, differences = [], []
        for sigma_k, x0_k in reversed(points[-order:-1]):
            ratio = (math.log(sigma_0) - math.log(sigma_k)) / h
            ratios.append(ratio)
            differences.append((x0_k - x0_0) / ratio)
        b = _phi_coefficients(h, order)
        base = sigma / sigma_0 * x - math.expm1(-h) * x0_0
        if order == 1:
            predicted = base
        else:
            weights = [0.5] if order == 2 else _solve(ratios, b[:-1])
            predicted = base + h * sum(w * d for w, d in zip(weights, differences, strict=True))
        x0_new = model(predicted, sigmas[index]).double()
        weights = [0.5] if order == 1 else _solve([*ratios, 1.0], b)
        correction = sum(w * d for w, d in zip(weights[:-1], differences, strict=True)) + weights[-1] * (x0_new - x0_0)
        x = base + h * correction
        points.append((sigma, x0_new))
    return points[-1][1]
