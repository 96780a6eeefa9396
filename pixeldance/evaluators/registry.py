"""Evaluators by name: config.evals.vae and config.evals.dit list the names a run uses."""
from __future__ import annotations

from pixeldance.evaluators import metrics, reconstruction, samples

EVALUATORS = {
    "reconstruction": reconstruction.Reconstruction,  # subject 'vae'
    "faithfulness": samples.Faithfulness,             # subject 'pipeline'
    "samples": samples.FolderSamples,                 # subject 'pipeline'
    "metrics": metrics.ProtocolMetrics,               # subject 'pipeline': FVD/FID/IS/CLIPSIM
}


def make(names, config, subject: str) -> list:
    """The evaluators `names` (a sequence of EVALUATORS keys) built from `config`; each must
    evaluate `subject` ('vae' or 'pipeline'). Unknown names and mismatches: one-line ValueError."""
    out = []
    for name in names:
        if name not in EVALUATORS:
            raise ValueError(f"unknown evaluator {name!r} in config.evals; choose from {sorted(EVALUATORS)}")
        cls = EVALUATORS[name]
        if cls.subject != subject:
            raise ValueError(f"evaluator {name!r} evaluates a {cls.subject}, not a {subject} "
                             f"(config.evals.{'vae' if subject == 'vae' else 'dit'})")
        out.append(cls(config))
    return out
