"""Built-in defenses, one module each, registered through the plugin hooks like any other."""
