"""The carrot service. Importing this package imports nothing: see ``patch``."""
