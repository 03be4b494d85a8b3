"""The test suite; shared builders live in tests/support/."""
