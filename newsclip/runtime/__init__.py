"""The runtime: the runner, Ray set-up, the console, and the stores on disk."""
