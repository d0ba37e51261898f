"""Runnable examples (see README.md here). A package only so that a worker can import
``examples.custom_strategy`` from the repository root; it is not installed with the
coordinator."""
