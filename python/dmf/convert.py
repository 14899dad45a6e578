"""The old name of dmf.checkpoint (issue 14): `import dmf.convert` and `from dmf import convert`
give the dmf.checkpoint module itself, so patching one patches the other."""
import sys

from . import checkpoint

sys.modules[__name__] = checkpoint
