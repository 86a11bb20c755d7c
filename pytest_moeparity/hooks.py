"""Hook specifications that pytest-moeparity adds to pytest."""


def pytest_moeparity_register_backends(registry):
    """Register extra backends: ``registry.register(name, factory)``, ``factory(model) -> engine``.

    Implement it in a ``conftest.py`` (any level) or a plugin; ``engine.trace(tokens, plan)``
    must return a :class:`pytest_moeparity.trace.Trace`. Accepting the keywords
    ``faults=(), forced_routing=None, layer_inputs=None`` as well enables --moe-inject,
    --moe-forced-routing, --moe-isolated and the per-expert drill-down for that engine
    (see :mod:`pytest_moeparity.backends`).
    """
