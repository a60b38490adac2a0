"""``study report``: a study's top trials, Optuna's plots and one HTML page; an ablation's tables again."""
