"""Built-in defenses, one folder each (the defense, its options, its helpers, data and
commands), registered through the plugin hooks exactly like a third-party plugin."""
