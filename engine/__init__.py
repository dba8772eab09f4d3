"""safeblend: low-memory, memory-mapped merging of LLM checkpoints."""

__version__ = "0.1.0"

from .api import MergeResult, merge  # noqa: E402
from .errors import SafeblendError  # noqa: E402
# The function shadows the module's attribute here: import from it as `from engine.sweep import ...`.
from .sweep import SweepResult, sweep  # noqa: E402

__all__ = ["MergeResult", "SafeblendError", "SweepResult", "__version__", "merge", "sweep"]
