"""The test suite (a package, so ``tests.helpers`` imports like any other module)."""
