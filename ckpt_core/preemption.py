"""Old import path, an alias of :mod:`ckpt_core.policy.preemption`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.policy import preemption as _moved

sys.modules[__name__] = _moved
