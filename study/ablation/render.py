"""Render ``study/ablation/stats.py`` summaries: Markdown (terminal, MLflow) and LaTeX (booktabs, paper-ready).

Both renderers are written here rather than through ``DataFrame.to_markdown`` / ``Styler.to_latex``
because those need ``tabulate`` / ``jinja2``, which the project does not depend on.
"""

from __future__ import annotations

import math

import pandas as pd

from study.ablation.stats import BEST_VAL, CONFIDENCE, METRICS, Block, reference_of

HEADERS = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rSum")
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in str(text))


def mean_std(mean: float, std: float, pm: str = " ± ") -> str:
    """``71.3 ± 1.2``; the mean alone with one seed; an en dash when the row has no result."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.1f}" if not math.isfinite(std) else f"{mean:.1f}{pm}{std:.1f}"


def signed(value: float, minus: str = "−") -> str:
    if not math.isfinite(value):
        return "–"
    return f"+{value:.1f}" if value >= 0 else f"{minus}{abs(value):.1f}"


def delta_cell(row: pd.Series, minus: str = "−") -> str:
    """``−12.3 [−15.0, −9.6]``: Δ rSum and its 95 % CI; Δ alone where the CI is undefined."""
    text = signed(row["delta_rsum"], minus)
    low, high = row.get("delta_ci_low", math.nan), row.get("delta_ci_high", math.nan)
    if math.isfinite(low) and math.isfinite(high):
        text += f" [{signed(low, minus)}, {signed(high, minus)}]"
    return text


def epoch_cell(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) else "–"


def shows_epoch(block: Block) -> bool:
    """Under best_val each run picks its own epoch, so the table shows the row's mean."""
    return block.select == BEST_VAL


def delta_header(reference: str) -> str:
    return f"Δ rSum vs {reference} [{CONFIDENCE:.0%} CI]"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s string cells (index not included)."""
    cells = [[str(v).replace("|", r"\|") for v in row] for row in frame.astype(str).to_numpy()]
    header = [str(c).replace("|", r"\|") for c in frame.columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda row: "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in cells)])


def display_frame(summary: pd.DataFrame, mark: str = "†", pm: str = " ± ", minus: str = "−",
                  epoch: bool = False) -> pd.DataFrame:
    """Summary -> string cells: Variant, six R@K, rSum (with the mark where the Holm-adjusted p
    < 0.05), Δ rSum with its 95 % CI (– on the reference) and, with ``epoch``, the mean selected epoch."""
    reference = reference_of(list(summary.index))
    rows = []
    for name, row in summary.iterrows():
        cells = [mean_std(row[f"{m}_mean"], row[f"{m}_std"], pm) for m in METRICS]
        if row["significant"]:
            cells[-1] += mark
        cells.append("–" if name == reference else delta_cell(row, minus))
        if epoch:
            cells.append(epoch_cell(row["epoch_mean"]))
        rows.append([name, *cells])
    columns = ["Variant", *HEADERS, delta_header(reference), *(["Epoch"] if epoch else [])]
    return pd.DataFrame(rows, columns=columns)


def to_markdown(summaries: dict[Block, pd.DataFrame], caption: str) -> str:
    parts = []
    for block, summary in summaries.items():
        if len(summaries) > 1:
            parts.append(f"**{block.title}**\n")
        parts.append(markdown_table(display_frame(summary, epoch=shows_epoch(block))) + "\n")
    parts.append(caption + "\n")
    return "\n".join(parts)


def best_rows(summary: pd.DataFrame) -> dict[str, set]:
    """Per metric the variants with the highest mean (ties all bold); Δ follows rSum off the reference."""
    best = {m: set(summary.index[summary[f"{m}_mean"] == summary[f"{m}_mean"].max()]) for m in METRICS}
    best["delta_rsum"] = best["rsum"] - {reference_of(list(summary.index))}
    return best


def latex_rows(summary: pd.DataFrame, epoch: bool = False) -> list[str]:
    best, reference = best_rows(summary), reference_of(list(summary.index))
    bold = lambda text, on: rf"\textbf{{{text}}}" if on else text  # noqa: E731
    lines = []
    for name, row in summary.iterrows():
        cells = [latex_escape(name)]
        for m in METRICS:
            cell = bold(mean_std(row[f"{m}_mean"], row[f"{m}_std"], pm=r"$\pm$"), name in best[m])
            cells.append(cell + (r"$^\dagger$" if m == "rsum" and row["significant"] else ""))
        if name == reference:
            cells.append("--")
        else:  # the CI in small type under the bold-able Δ
            delta, _, ci = delta_cell(row, minus="$-$").partition(" ")
            cells.append(bold(delta, name in best["delta_rsum"]) + (rf" {{\scriptsize {ci}}}" if ci else ""))
        if epoch:
            cells.append(epoch_cell(row["epoch_mean"]))
        lines.append(" & ".join(cells).replace("–", "--") + r" \\")
    return lines


def to_latex(summaries: dict[Block, pd.DataFrame], caption: str, label: str = "tab:ablation") -> str:
    """One ``table`` with booktabs rules; COCO's 1K and 5K blocks stacked under their own headings."""
    reference = latex_escape(reference_of(list(next(iter(summaries.values())).index)))
    epoch = shows_epoch(next(iter(summaries)))
    width = 9 + epoch
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
             r"\begin{tabular}{l" + "c" * (width - 1) + "}", r"\toprule",
             r" & \multicolumn{3}{c}{Image$\rightarrow$Text} & \multicolumn{3}{c}{Text$\rightarrow$Image} & & "
             + "& " * epoch + r"\\",
             r"\cmidrule(lr){2-4} \cmidrule(lr){5-7}",
             r"Variant & R@1 & R@5 & R@10 & R@1 & R@5 & R@10 & rSum & $\Delta$ rSum vs " + reference
             + rf" [{CONFIDENCE:.0%} CI]".replace("%", r"\%") + (" & Epoch" if epoch else "") + r" \\"]
    for block, summary in summaries.items():
        lines.append(r"\midrule")
        if len(summaries) > 1:
            lines.append(rf"\multicolumn{{{width}}}{{l}}{{\textit{{" + latex_escape(block.title) + r"}} \\")
        lines.extend(latex_rows(summary, epoch))
    escaped = latex_escape(caption).replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("Δ", r"$\Delta$")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + escaped + "}", r"\label{" + label + "}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"
