"""Entry point of ``bt-transfer``: imports every command module so each registers itself."""

from __future__ import annotations

from ._app import app

# Each import registers one command on ``app``.
from . import inspect_cmd  # noqa: F401,E402
from . import convert_cmd  # noqa: F401,E402
from . import fit_prior_cmd  # noqa: F401,E402
from . import make_prior_cmd  # noqa: F401,E402
from . import finetune_cmd  # noqa: F401,E402
from . import predict_cmd  # noqa: F401,E402
from . import evaluate_cmd  # noqa: F401,E402
from . import tune_cmd  # noqa: F401,E402
from . import compare_cmd  # noqa: F401,E402
from . import demo_cmd  # noqa: F401,E402

__all__ = ["app"]
