"""Old import path, an alias of :mod:`ckpt_core.policy.exporter`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.policy import exporter as _moved

sys.modules[__name__] = _moved
