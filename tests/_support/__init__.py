"""Support shared by the tests and the benchmarks: example bundles, real servers on loopback, free ports.

Pytest fixtures stay in the ``conftest.py`` files and call these; benchmarks import them as
``from tests._support import ServerProcess`` (they put the repository root on ``sys.path``).
"""

from .bundles import SGD, build_bundle, make_bundle
from .servers import TOKEN, ServerProcess, free_port, threaded_server, wait_until_healthy

__all__ = ["SGD", "TOKEN", "ServerProcess", "build_bundle", "free_port", "make_bundle", "threaded_server",
           "wait_until_healthy"]
