"""Old import path, an alias of :mod:`ckpt_core.content.hf_native`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import hf_native as _moved

sys.modules[__name__] = _moved
