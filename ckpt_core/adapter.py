"""Old import path, an alias of :mod:`ckpt_core.protocol.state_dict_adapter`.

Kept for one release; import from the new path.
"""

import sys

from ckpt_core.protocol import state_dict_adapter as _moved

sys.modules[__name__] = _moved
