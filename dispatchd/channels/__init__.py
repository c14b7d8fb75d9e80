"""Channel adapters: they move bytes between the engine's actions and the outside world."""
