"""CE-CoLLM's predicted latency at a given exit rate, and the split it would choose (pure).

The edge (the source) runs units [0, split) and an exit head (the model's own final norm +
lm_head, i.e. unit N-1 again, on the last position); the cloud runs [split, N). Every
token decides at the edge: with probability `exit_rate` it exits (no message), otherwise
the edge uploads every hidden state the cloud has not seen and waits for the token.

Model of one sequence (P prompt tokens, G generated, exit rate e, decisions independent):

    edge       = prefill(edge, [0, split)) + (G - 1) decode(edge, [0, split)) + G head(edge)
    calls C    = (1 - e) G
    uploaded U = (1 - e^G)(P + G - 1) tokens: once the cloud is called at all, every
                 hidden state it has not seen goes up (the trailing exits after the last
                 call never do; not subtracted: an upper bound)
    cloud      = C decode(cloud, [split, N)) + (U - C) marginal, where `marginal` is one
                 more token in a batch: prefill(cloud, [split, N-1)) / P
    links      = C (latency up + token return) + U bytes_per_token / bandwidth
    per_token  = (edge + cloud + links) / G

Hop bytes come from the Problem (already the wire's compressed size: compress_activations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .problem import Infeasible, Problem


@dataclass(frozen=True)
class CeCollmPrediction:
    split: int
    exit_rate: float
    per_token_s: float
    tokens_per_s: float
    prefill_s: float
    """Time to the first token, expected: edge prefill + (1 - e) (upload P + cloud + back)."""
    decode_s: float
    """One decode step, expected: the sequence's time after the first token over G - 1."""
    edge_s: float
    """Edge compute per token (units [0, split) and the exit head)."""
    cloud_s_per_token: float
    """Cloud compute per generated token, expected."""
    cloud_calls_per_token: float
    upload_bytes_per_token: float
    link_s_per_token: float
    pipeline_tokens_per_s: float
    """Sequential only: the same as tokens_per_s (kept for the results file's schema)."""

    def to_dict(self) -> dict:
        return {k: float(v) if k != "split" else int(v) for k, v in asdict(self).items()}


def predict(
    prob: Problem,
    split: int,
    cloud: int,
    exit_rate: float,
    standalone: bool = False,
) -> CeCollmPrediction:
    """Expected latency of CE-CoLLM with edge units [0, split) on the source."""
    n, edge = prob.n_units, prob.source
    if not 1 <= split <= n - 1:
        raise ValueError(f"split {split}: the edge needs unit 0, the cloud the head (unit {n - 1})")
    e = 1.0 if standalone else float(exit_rate)
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"exit rate {exit_rate} is not a fraction")
    p = prob.profile
    P, G = p.prompt_tokens, p.new_tokens
    head = float(prob.decode[edge, n - 1])
    edge_pre = float(prob.prefill[edge, :split].sum()) + head
    edge_dec = float(prob.decode[edge, :split].sum()) + head
    cloud_dec = float(prob.decode[cloud, split:].sum())
    cloud_pre = float(prob.prefill[cloud, split:].sum())
    marginal = float(prob.prefill[cloud, split : n - 1].sum()) / max(P, 1)
    per_tok_bytes = float(prob.act_decode[split - 1])
    lat_up, bw = float(p.latency_s[edge, cloud]), float(p.bandwidth[edge, cloud])
    back = float(prob.return_s()[cloud])
    calls = (1.0 - e) * G
    uploaded = (1.0 - e**G) * (P + G - 1) if e < 1.0 else 0.0
    edge_total = edge_pre + (G - 1) * edge_dec
    cloud_total = calls * cloud_dec + max(uploaded - calls, 0.0) * marginal
    link_total = calls * (lat_up + back) + uploaded * per_tok_bytes / bw
    per_token = (edge_total + cloud_total + link_total) / G
    first = edge_pre + (1.0 - e) * (lat_up + P * per_tok_bytes / bw + cloud_pre + back)
    step = (per_token * G - first) / (G - 1) if G > 1 else 0.0  # the rest, per step
    return CeCollmPrediction(
        split=split,
        exit_rate=e,
        per_token_s=per_token,
        tokens_per_s=prob.batch / per_token if per_token > 0 else float("inf"),
        prefill_s=first,
        decode_s=step,
        edge_s=edge_total / G,
        cloud_s_per_token=cloud_total / G,
        cloud_calls_per_token=calls / G,
        upload_bytes_per_token=uploaded * per_tok_bytes / G,
        link_s_per_token=link_total / G,
        pipeline_tokens_per_s=prob.batch / per_token if per_token > 0 else float("inf"),
    )


def choose_split(
    prob: Problem, cloud: int, exit_rate: float, standalone: bool = False
) -> CeCollmPrediction:
    """The split with the least predicted ms/token whose two parts fit in memory (the edge
    also holds the exit head: the head unit's memory again). The exit rate is taken as
    given, the same at every split (in truth a deeper split exits more often).

    Standalone: the deepest split the edge can hold. Its latency only grows with depth,
    but the exit head's quality is what depth buys, and the cost model cannot see it."""
    n, edge = prob.n_units, prob.source
    budget, mem = prob.profile.memory_budget, prob.memory
    best = None
    for split in range(1, n):
        edge_mem = float(mem[:split].sum() + mem[n - 1])
        cloud_mem = float(mem[split:].sum())
        if edge_mem > budget[edge] or (cloud_mem > budget[cloud] and not standalone):
            continue
        pred = predict(prob, split, cloud, exit_rate, standalone)
        if not np.isfinite(pred.per_token_s):
            continue
        if standalone or best is None or pred.per_token_s < best.per_token_s:
            best = pred
    if best is None:
        raise Infeasible(
            f"ce-collm: no split fits: the edge ({budget[edge] / 1e6:.1f} MB) must hold "
            f"units [0, split) and the exit head, the cloud ({budget[cloud] / 1e6:.1f} MB) "
            f"the rest; the model needs {float(mem.sum()) / 1e6:.1f} MB"
        )
    return best
