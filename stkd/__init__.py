"""STKD: similarity transfer knowledge distillation, in plain PyTorch.

Nothing here imports Ray or MLflow: the package can be used alone in a notebook.
"""

__version__ = "0.1.0"
