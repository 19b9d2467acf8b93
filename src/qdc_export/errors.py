"""Error types. ``UserError`` and its subclasses are the user's to fix: the CLI prints one line and exits
non-zero. Anything else is a bug in qdc-export and keeps its traceback."""


class UserError(Exception):
    """Bad input: a path, an option value, an unsupported model, a failed parity check."""


class ModelLoadError(UserError):
    """MODEL is missing, not a diffusers folder, or an unsupported architecture."""


class OutputExistsError(UserError):
    """The output folder exists and ``--force`` was not given."""


class ParityError(UserError):
    """An exported model does not behave like its PyTorch reference within the stated tolerances."""


class RejectedBuild(ParityError):
    """A build that failed its parity check: its staging folder is kept beside ``--out`` as
    ``NAME.failed-check`` for inspection, never moved into ``--out`` (infra/staging.py)."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary


class CalibrationError(UserError):
    """Calibration saw NaN/Inf or left ranges without data."""


class TensorRTCompatibilityError(UserError):
    """The ONNX model breaks one of TensorRT's explicit-quantization rules."""


class PassError(RuntimeError):
    """A graph pass's precondition or postcondition failed (a bug, not a user error)."""
