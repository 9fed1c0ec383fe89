"""Subcommands of the ``bpsim`` CLI; each module defines ``add_parser`` and ``run``."""
