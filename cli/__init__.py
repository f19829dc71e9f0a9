"""The `moss-speech` command line: one module per area (model, build, train, triton, service, demo)."""
