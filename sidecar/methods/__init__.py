"""The method handlers, one module per domain: ``system`` (supports, status, cancel, shutdown, exit),
``train``, ``generate`` and ``adapters``. Each handler decodes nothing itself (rpc does, from
wire.METHODS), runs the request's checks at the door, queues its job or answers at once, and returns
a result Struct.

Importing this package registers every handler with ``rpc.method`` and checks that the registry and
wire.METHODS name the same methods. No torch at import.
"""

from .. import rpc
from . import adapters, generate, memory, system, train

rpc.check_registry()

__all__ = ["adapters", "generate", "memory", "system", "train"]
