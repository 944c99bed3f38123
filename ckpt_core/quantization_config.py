"""Old import path, an alias of :mod:`ckpt_core.content.quantization_config`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.content import quantization_config as _moved

sys.modules[__name__] = _moved
