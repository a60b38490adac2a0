"""Worker side of itm-study: data, models, losses, methods, evaluation and the training loop.

Nothing in this package imports ``study`` (the driver side), MLflow or Optuna.
"""
