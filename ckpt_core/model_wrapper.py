"""Old import path, an alias of :mod:`ckpt_core.content.model_wrapper`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import model_wrapper as _moved

sys.modules[__name__] = _moved
