"""An example fanout plug-in, tested with the plug-in test kit alone (docs/handlers.md)."""
