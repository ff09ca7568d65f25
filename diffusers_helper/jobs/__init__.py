"""The job queue: a persistent store of jobs, and the worker that runs them on a loaded engine."""
