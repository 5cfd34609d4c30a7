"""The ``idvault`` command line: one module per group of commands, ``main`` the entry."""
