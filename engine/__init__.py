"""safeblend: low-memory, memory-mapped merging of LLM checkpoints.

The public API: ``merge`` (one merged checkpoint), ``sweep`` (several weights in one read
pass), ``diff`` (where fine-tuning moved the model) and ``verify`` (re-check a merged
checkpoint against its manifest). The compute backends are ``safeblend.kernels``.
"""

__version__ = "0.1.0"

from .api import MergeResult, merge  # noqa: E402
from .drift import DriftReport, diff  # noqa: E402
from .errors import SafeblendError  # noqa: E402
from .evaluate import EvalPlan  # noqa: E402
from .lambda_sweep import SweepResult, sweep  # noqa: E402
from .manifest import VerifyReport, verify  # noqa: E402
from .sweep_report import SweepReport  # noqa: E402

__all__ = ["DriftReport", "EvalPlan", "MergeResult", "SafeblendError", "SweepReport", "SweepResult", "VerifyReport",
           "__version__",
           "diff", "merge", "sweep", "verify"]
