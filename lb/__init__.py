"""lb: an HTTP/1.1 reverse proxy with health-checked balancing, built to stand in for nginx."""

from proxycore.compiled import require_fresh

require_fresh()
