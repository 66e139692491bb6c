"""dfkd: data-free knowledge distillation from the command line."""

__version__ = "0.1.0"
