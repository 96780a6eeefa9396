"""The metrics as pure functions of features (numpy, float64): Frechet distance, Inception Score,
CLIPSIM. Nothing here runs a network; `pixeldance.metrics.networks` computes the features.

Shapes: B samples (videos or frames), F frames (the glossary's letters, pixeldance/models/__init__.py);
'features', 'classes' and 'embed' are the widths of the networks' outputs.
"""
from __future__ import annotations

import numpy as np


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64)."""
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """The Frechet distance of two Gaussians N(mu1, cov1), N(mu2, cov2) (mu: [features], cov: [features, features]):

        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

    in float64. tr((cov1 cov2)^(1/2)) equals tr((s cov2 s)^(1/2)) with s = cov1^(1/2): that matrix is
    symmetric PSD, so its eigenvalues are real and non-negative up to rounding (clipped at 0). This
    is the real part of the trace that `scipy.linalg.sqrtm(cov1 @ cov2)` gives (the reference
    FID/FVD code's way, which takes `.real` of a complex result), computed without a complex
    square root and without the reference's epsilon retry on singular covariances (fewer samples
    than Z features make them rank-deficient; the formula stays defined there).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                         f"cov {cov1.shape} / {cov2.shape}")
    s = _psd_sqrt((cov1 + cov1.T) / 2)
    middle = s @ cov2 @ s
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive parts of exp(E_x KL(p(y|x) || p(y))).

    logits: [B, classes] pre-softmax class scores (float); B must be at least `splits`. The parts are
    consecutive slices in the given order (as the reference implementations split), the last
    B mod splits samples dropped so every part has B // splits samples; std is numpy's population
    std (ddof=0), as the references report it.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or splits < 1 or len(logits) < splits:
        raise ValueError(f"inception_score needs logits [B, classes] with B >= splits; got "
                         f"{logits.shape}, splits={splits}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log-softmax
    n = len(logp) // splits
    scores = []
    for k in range(splits):
        part = logp[k * n:(k + 1) * n]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def clipsim(frame_embeddings, text_embeddings) -> float:
    """Mean over videos and frames of the cosine similarity between each frame's CLIP image
    embedding and its video's caption embedding (unscaled: in [-1, 1]; the papers that print
    0.2-0.3 use this; some code multiplies by 100 or clamps at 0).

    frame_embeddings: [B, F, embed] (or [B, embed] for one frame per video); text_embeddings:
    [B, embed].
    """
    img = np.asarray(frame_embeddings, np.float64)
    txt = np.asarray(text_embeddings, np.float64)
    if img.ndim == 2:
        img = img[:, None]
    if img.ndim != 3 or txt.shape != (img.shape[0], img.shape[2]):
        raise ValueError(f"clipsim needs frames [B, F, embed] and texts [B, embed]; got {img.shape}, {txt.shape}")
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    return float(np.einsum("nfe,ne->nf", img, txt).mean())
