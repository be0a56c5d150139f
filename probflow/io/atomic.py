"""`probflow.files.atomic` (atomic writes) under its former name, for existing imports."""

from probflow.files.atomic import *  # noqa: F403
from probflow.files.atomic import __all__  # noqa: F401
