"""Side-by-side benchmarks of the Python proxies against nginx and HAProxy."""
