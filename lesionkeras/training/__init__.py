"""The run loop shared by every method and task, its callbacks, distribution and the Method interface."""
