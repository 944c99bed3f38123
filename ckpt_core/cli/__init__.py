"""The ``ckpt`` command line: one module per subcommand."""
