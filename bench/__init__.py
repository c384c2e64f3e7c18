"""The benchmark harness of the gateway: see bench/README.md."""
