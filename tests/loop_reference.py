"""An independent, loop-based float64 reference of the mHC operators, for tests only.

Plain Python floats and loops, one token at a time, written straight from the formulas of
docs/method.md (Sinkhorn in the literal division form, not the log domain the package uses).
Slow by design: use it on a handful of tokens.
"""

from __future__ import annotations

import math

import torch


def sinkhorn_matrix(logits: list[list[float]], iters: int) -> list[list[float]]:
    n = len(logits)
    top = max(max(row) for row in logits)
    m = [[math.exp(value - top) for value in row] for row in logits]
    for _ in range(iters):
        for j in range(n):
            column_sum = sum(m[i][j] for i in range(n))
            for i in range(n):
                m[i][j] /= column_sum
        for i in range(n):
            row_sum = sum(m[i])
            m[i] = [value / row_sum for value in m[i]]
    return m


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def mappings_token(x, phi, alpha, bias, iters, eps):
    """x: n lists of C floats; phi: n*C lists of n*n + 2n floats; returns (pre, post, res)."""
    n = len(x)
    v = [value for stream in x for value in stream]
    r = math.sqrt(sum(value * value for value in v) / len(v) + eps)
    m = [sum(v[k] * phi[k][col] for k in range(len(v))) for col in range(n * n + 2 * n)]
    pre = [sigmoid(alpha[0] * m[i] / r + bias[i]) for i in range(n)]
    post = [2.0 * sigmoid(alpha[1] * m[n + i] / r + bias[n + i]) for i in range(n)]
    logits = [
        [alpha[2] * m[2 * n + i * n + j] / r + bias[2 * n + i * n + j] for j in range(n)]
        for i in range(n)
    ]
    return pre, post, sinkhorn_matrix(logits, iters)


def hc_mappings_token(x, weight, alpha, static_pre, static_post, static_res, eps):
    """HC (its eq. 10-13): x: n lists of C floats; weight: C lists of n + 2 floats; returns (pre, post,
    res) with res[o][i] = A_r[i][o], the weight of input stream i in output stream o."""
    n, hidden = len(x), len(x[0])
    dynamic = []
    for stream in x:
        r = math.sqrt(sum(value * value for value in stream) / hidden + eps)
        dynamic.append([math.tanh(sum(stream[c] / r * weight[c][k] for c in range(hidden))) for k in range(n + 2)])
    pre = [alpha[0] * dynamic[i][0] + static_pre[i] for i in range(n)]
    post = [alpha[1] * dynamic[i][1] + static_post[i] for i in range(n)]
    res = [[alpha[2] * dynamic[i][2 + o] + static_res[i][o] for i in range(n)] for o in range(n)]
    return pre, post, res


def pre_token(x, h_pre):
    return [sum(h_pre[i] * x[i][c] for i in range(len(x))) for c in range(len(x[0]))]


def post_res_token(x, f, h_post, h_res):
    n, hidden = len(x), len(x[0])
    return [
        [sum(h_res[i][j] * x[j][c] for j in range(n)) + h_post[i] * f[c] for c in range(hidden)]
        for i in range(n)
    ]


def per_token(function, *tensors, token_dims: int):
    """Apply ``function`` to each token of tensors sharing ``token_dims`` leading dimensions."""
    lead = tensors[0].shape[:token_dims]
    flat = [t.detach().to(torch.float64).reshape(-1, *t.shape[token_dims:]).tolist() for t in tensors]
    results = [function(*token) for token in zip(*flat)]
    if isinstance(results[0], tuple):
        return tuple(
            torch.tensor([r[k] for r in results], dtype=torch.float64).reshape(*lead, *torch.tensor(results[0][k]).shape)
            for k in range(len(results[0]))
        )
    return torch.tensor(results, dtype=torch.float64).reshape(*lead, *torch.tensor(results[0]).shape)


def op_outputs(op: str, inputs) -> tuple:
    """The float64 outputs of ``op`` (``sinkhorn``, ``mappings``, ``mappings_pre``, ``pre``, ``post_res``,
    ``hc_mappings_pre``, ``post_res_mappings_pre``) for the arguments the public operator takes, tokens on the first dimension, one
    token at a time."""
    if op == "sinkhorn":
        logits, iters = inputs
        return (per_token(lambda m: sinkhorn_matrix(m, iters), logits, token_dims=1),)
    if op == "mappings":
        x, phi, alpha, bias, iters, eps = inputs
        args = (phi.tolist(), alpha.tolist(), bias.tolist(), iters, eps)
        return per_token(lambda token: mappings_token(token, *args), x, token_dims=1)
    if op == "mappings_pre":
        h_pre, h_post, h_res = op_outputs("mappings", inputs)
        return per_token(pre_token, inputs[0], h_pre, token_dims=1), h_pre, h_post, h_res
    if op == "pre":
        return (per_token(pre_token, *inputs, token_dims=1),)
    if op == "post_res":
        return (per_token(post_res_token, *inputs, token_dims=1),)
    if op == "hc_mappings_pre":
        x, *parameters, eps = inputs
        args = (*(p.tolist() for p in parameters), eps)
        h_pre, h_post, h_res = per_token(lambda token: hc_mappings_token(token, *args), x, token_dims=1)
        return per_token(pre_token, x, h_pre, token_dims=1), h_pre, h_post, h_res
    if op == "post_res_mappings_pre":
        (streams,) = op_outputs("post_res", inputs[:4])
        return (streams, *op_outputs("mappings_pre", [streams, *inputs[4:]]))
    raise ValueError("op must be one of 'sinkhorn', 'mappings', 'mappings_pre', 'pre', 'post_res', "
                     f"'hc_mappings_pre', 'post_res_mappings_pre', got {op!r}")
