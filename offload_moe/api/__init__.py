"""The Python API: `load()` and the `Model` facade, its settings, chat sessions, checkpoint sources."""
