"""Hook specifications that pytest-moeparity adds to pytest."""


def pytest_moeparity_register_backends(registry):
    """Register extra backends: ``registry.register(name, factory)``, ``factory(model) -> engine``.

    Implement it in a ``conftest.py`` (any level) or a plugin; ``engine.trace(tokens, plan)``
    must return a :class:`pytest_moeparity.trace.Trace`.
    """
