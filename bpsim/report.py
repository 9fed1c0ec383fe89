"""The Markdown report of ``bpsim fit``: fitted distributions, predictor scores and their plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bpsim.fitting import Rounds
from bpsim.scoring import Evaluation


def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def _interval(interval, digits: int = 4) -> str:
    if not interval:
        return ""
    low, high = interval
    return f" [{_number(low, digits)}, {_number(high, digits)}]"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def plot_histograms(evaluation: Evaluation, rounds: Rounds, folder: Path) -> list[Path]:
    """Plot, per draft_len, the observed accepted counts of ``rounds`` against each fitted pmf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpsim.fitting import round_pmfs

    paths = []
    drafted = rounds.subset(rounds.draft_len > 0)
    for n in np.unique(drafted.draft_len):
        subset = drafted.subset(drafted.draft_len == n)
        observed = np.bincount(subset.accepted, minlength=n + 1)[:n + 1] / len(subset)
        figure, axes = plt.subplots(figsize=(6, 3.5))
        k = np.arange(n + 1)
        axes.bar(k, observed, color="0.8", label=f"observed ({len(subset)} rounds)")
        for family, fit in evaluation.fits.items():
            expected = round_pmfs(fit.predictor, subset)[:, :n + 1].mean(axis=0)
            axes.plot(k, expected, marker="o", label=family)
        axes.set_xlabel("accepted drafts")
        axes.set_ylabel("share of rounds")
        axes.set_title(f"{evaluation.label}: draft_len {n}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"histogram-{_slug(evaluation.label)}-draft_len-{n}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def plot_scores(evaluation: Evaluation, folder: Path) -> Path:
    """Plot each predictor's expected speed and hit rate with their bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = evaluation.scores
    names = [score.name for score in scores]
    figure, (speed_axes, hit_axes) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5), sharey=True)
    for axes, metric, title in ((speed_axes, "speed", "expected tokens per ms"), (hit_axes, "hit_rate", "hit rate")):
        values = np.array([getattr(score, metric) for score in scores])
        low = np.array([score.intervals.get(metric, (v, v))[0] for score, v in zip(scores, values)])
        high = np.array([score.intervals.get(metric, (v, v))[1] for score, v in zip(scores, values)])
        axes.barh(names, values, xerr=[values - low, high - values], color="0.6", ecolor="k", capsize=2)
        axes.set_xlabel(title)
    for color, (name, value) in zip(("C1", "C2"), evaluation.references.items()):
        speed_axes.axvline(value, color=color, linestyle="--", linewidth=1, label=name.replace("_", " "))
    speed_axes.legend(fontsize=7)
    speed_axes.invert_yaxis()
    figure.tight_layout()
    path = folder / f"scores-{_slug(evaluation.label)}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def evaluation_markdown(evaluation: Evaluation, histogram_paths: list[Path], score_path: Path) -> str:
    """Return the report section of one evaluation (all rounds or one stratum)."""
    split = ("held-out requests" if evaluation.held_out
             else "the training rounds themselves (one request, so these scores are in-sample)")
    settings = evaluation.settings
    lines = [
        f"## {evaluation.label}",
        "",
        f"Fitted on {evaluation.train_rounds} rounds, scored on {evaluation.test_rounds} rounds of "
        f"{evaluation.test_requests} {split}. Intervals are 95% bootstrap intervals over requests.",
        "",
        "```",
        settings.latency.describe(),
        "```",
        "",
        f"Branch-token guesses: bonus {settings.bonus_guess_rate:.3f} (estimated by the first draft's acceptance "
        f"rate), correction {settings.correction_guess_rate:.3f} (measured); per-token acceptance rate "
        f"{settings.per_token_rate:.3f}.",
        "",
        "### Distributions",
        "",
        "| family | parameters | loglike | AIC | BIC | chi-square | df | p-value | held-out loglike per round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family, fit in evaluation.fits.items():
        params = ("histogram" if family == "empirical" else
                  ", ".join(f"{key} {_number(value) if not isinstance(value, list) else [round(v, 3) for v in value]}"
                            for key, value in fit.fitted_params.items()))
        heldout = evaluation.heldout[family]
        lines.append(f"| {family} | {params} | {_number(fit.loglike, 6)} | {_number(fit.aic, 6)} | "
                     f"{_number(fit.bic, 6)} | {_number(fit.chi2)} | {fit.chi2_df if fit.chi2_total else 'n/a'} | "
                     f"{_number(fit.chi2_pvalue, 3)} | {_number(heldout['per_round'])}{_interval(heldout['interval'])} |")

    lines += ["", "Chi-square per draft_len (bins pooled to at least 5 expected rounds, df = bins - 1 - fitted "
              "parameters; n/a where df < 1):", "",
              "| family | " + " | ".join(f"draft_len {n}" for n in _lengths(evaluation)) + " |",
              "| --- |" + " --- |" * len(_lengths(evaluation))]
    for family, fit in evaluation.fits.items():
        if not fit.chi2_by_draft_len:
            continue
        cells = []
        for n in _lengths(evaluation):
            test = fit.chi2_by_draft_len.get(n)
            cells.append("" if test is None else f"{_number(test.statistic)} (df {test.df}, p {_number(test.pvalue, 3)})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{path.stem}]({path.name})" for path in histogram_paths]

    lines += ["", "### Predictors", "",
              "| predictor | expected tokens/ms | at recorded draft_len | hit rate | mean abs error | mean next draft_len |",
              "| --- | --- | --- | --- | --- | --- |"]
    for score in evaluation.scores:
        lines.append(f"| {score.name} | {_number(score.speed)}{_interval(score.intervals.get('speed'))} | "
                     f"{_number(score.speed_recorded_len)}{_interval(score.intervals.get('speed_recorded_len'))} | "
                     f"{_number(score.hit_rate, 3)}{_interval(score.intervals.get('hit_rate'), 3)} | "
                     f"{_number(score.mae, 3)}{_interval(score.intervals.get('mae'), 3)} | "
                     f"{_number(score.mean_next_draft_len, 3)} |")

    references = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in evaluation.references.items())
    lines += ["", f"Reference speeds (tokens/ms): {references}.", "",
              f"Winner by expected speed: **{evaluation.winner.name}**.", "", f"![scores]({score_path.name})", ""]
    return "\n".join(lines)


def _lengths(evaluation: Evaluation) -> list[int]:
    return sorted({n for fit in evaluation.fits.values() for n in fit.chi2_by_draft_len})


def write_report(folder: Path, title_lines: list[str], sections: list[tuple[Evaluation, Rounds]]) -> Path:
    """Write ``report.md`` and its plots into ``folder``; each section is an evaluation and its training rounds."""
    parts = ["# Acceptance fits and predictor scores", "", *title_lines, "",
             "Speeds are modelled, not measured: the latency model applied to each predictor's choices on the "
             "recorded rounds. A predictor's own draft lengths reuse the recorded verdicts and fill in drafts "
             "past a recorded draft_len with the per-token acceptance rate; `bpsim replay` simulates the "
             "closed loop.", ""]
    for evaluation, train in sections:
        histograms = plot_histograms(evaluation, train, folder)
        scores = plot_scores(evaluation, folder)
        parts.append(evaluation_markdown(evaluation, histograms, scores))
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path
