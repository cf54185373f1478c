"""The `vigil` command and the wiring that starts services. Nothing imports it."""
