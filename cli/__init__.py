"""The `surgery` command."""
