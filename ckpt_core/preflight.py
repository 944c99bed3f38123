"""Old import path, an alias of :mod:`ckpt_core.policy.preflight`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.policy import preflight as _moved

sys.modules[__name__] = _moved
