"""zooscan's built-in plugins, registered through the ``zooscan`` entry-point group
exactly as a third-party package registers its own (see ``pyproject.toml``)."""
