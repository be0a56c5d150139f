"""`probflow.files.images` (image files ↔ tensors) under its former name, for existing imports."""

from probflow.files.images import *  # noqa: F403
from probflow.files.images import __all__  # noqa: F401
