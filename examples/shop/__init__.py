"""A small shop built from the classic async pitfalls, each endpoint broken and fixed.

``shop.broken.create_app()`` and ``shop.fixed.create_app()`` serve the same routes; the
tests in ``examples/`` run the same user-level tests against both.
"""
