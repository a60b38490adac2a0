"""``study ablate``: the plan (rows × seeds at fixed values), the Tune run, its MLflow runs, the
statistics and the table in Markdown, LaTeX and CSV."""
