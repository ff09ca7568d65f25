"""What the CLI and the app share: start-up flags and loading, the job worker, progress text."""
