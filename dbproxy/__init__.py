"""dbproxy: a PostgreSQL-aware TCP proxy that knows the master from the replica."""

from proxycore.compiled import require_fresh

require_fresh()
