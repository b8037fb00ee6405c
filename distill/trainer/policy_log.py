"""``RUN/policy.csv`` and ``policy_histogram.png``: what the RepFusion timestep policy did during a run."""
from __future__ import annotations

import csv
import logging
import statistics
from pathlib import Path

import torch

from ..policy import TimestepPolicy, per_sample_grad_variance
from .textlog import CsvLog

_logger = logging.getLogger(__name__)


class PolicyLog:
    """``policy.csv``: per logging interval, how often each candidate was sampled, reward, entropy and the
    variance of the per-sample policy gradient with no baseline, the leave-one-out batch mean and the EMA."""

    def __init__(self, path: Path, candidates: list, start: int, accelerator):
        self.path, self.candidates, self.accelerator = Path(path), list(candidates), accelerator
        self.counts = torch.zeros(len(candidates), dtype=torch.long, device=accelerator.device)
        self.total = torch.zeros(len(candidates), dtype=torch.long)
        self.log = CsvLog(self.path, start, accelerator.is_main_process, header=[
            "step", "entropy_weight", "reward", "entropy", "head_ce", "gradvar_none", "gradvar_batch_mean",
            "gradvar_ema"] + [f"n_t{t}" for t in self.candidates])

    def count(self, actions: torch.Tensor) -> None:
        """Add a micro-batch's sampled candidate indices ``(B,)`` (int64 in ``[0, len(candidates))``). A scatter-add,
        not ``bincount``: on a GPU ``bincount`` waits for the host to size its output."""
        self.counts.index_add_(0, actions.to(self.counts.device), torch.ones_like(actions, dtype=self.counts.dtype,
                                                                                  device=self.counts.device))

    def write(self, step: int, pol: TimestepPolicy, inputs, terms: dict, ew: float) -> None:
        """One row: the counts since the last row (summed over processes) and the gradient variances measured on
        the last micro-batch ``inputs`` (a `StepInput` of the policy source)."""
        counts = self.counts.clone()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        counts = counts.cpu()
        self.counts.zero_()
        self.total += counts
        if self.log.w is None:
            return
        with torch.no_grad():
            r = -torch.nn.functional.cross_entropy(pol.head(inputs.pooled), inputs.labels, reduction="none")
        n = r.shape[0]
        b_ema = pol.baseline_ema if bool(pol.baseline_initialised) else r.mean()
        gv = per_sample_grad_variance(pol.net, inputs.teacher_x, inputs.actions, {
            "none": r, "batch_mean": r - (r.sum() - r) / max(n - 1, 1), "ema": r - b_ema})
        self.log.write([step, round(ew, 5), round(terms.get("reward", 0.0), 5), round(terms.get("entropy", 0.0), 5),
                        round(terms.get("head_ce", 0.0), 5), f"{gv['none']:.6g}", f"{gv['batch_mean']:.6g}",
                        f"{gv['ema']:.6g}"] + counts.tolist())

    def close(self) -> None:
        """Close the CSV and plot the histogram (the CSV holds the same numbers)."""
        if self.log.f is None:
            return
        self.log.close()
        try:
            from ..plots import policy_histogram

            rows = list(csv.DictReader(open(self.path)))
            if rows:
                policy_histogram([int(r["step"]) for r in rows],
                                 [[int(r[f"n_t{t}"]) for t in self.candidates] for r in rows],
                                 self.candidates, self.path.with_name("policy_histogram.png"))
        except ImportError as e:  # matplotlib missing
            _logger.warning("policy histogram not plotted: %s", e)

    def summary(self) -> dict:
        """Samples per timestep over the run and the median gradient-variance ratios of the baselines."""
        rows = list(csv.DictReader(open(self.path))) if self.path.exists() else []
        tot = [sum(int(r[f"n_t{t}"]) for r in rows) for t in self.candidates]
        out = {"candidates": self.candidates, "samples_per_timestep": dict(zip(map(str, self.candidates), tot)),
               "histogram_png": str(self.path.with_name("policy_histogram.png"))}
        vs = [(float(r["gradvar_none"]), float(r["gradvar_batch_mean"]), float(r["gradvar_ema"])) for r in rows]
        vs = [v for v in vs if v[0] > 0]
        if vs:
            out["gradvar_ratio_batch_mean_over_none_median"] = round(statistics.median(b / a for a, b, _ in vs), 4)
            out["gradvar_ratio_ema_over_none_median"] = round(statistics.median(c / a for a, _, c in vs), 4)
        return out
