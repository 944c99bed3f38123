"""Old import path, an alias of :mod:`ckpt_core.policy.load_policy`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.policy import load_policy as _moved

sys.modules[__name__] = _moved
