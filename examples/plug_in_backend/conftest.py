"""How another repository plugs its own engine into pytest-moeparity.

An engine is any object with ``trace(tokens, plan) -> Trace``. Accepting the three keyword
arguments of the full protocol, ``trace(tokens, plan, *, faults=(), forced_routing=None,
layer_inputs=None)``, turns on fault injection (--moe-inject), forced routing
(--moe-forced-routing), isolated layers (--moe-isolated) and the per-expert drill-down for it;
an engine without them still gets the plain comparison (and a clear error if such a mode is
asked for).

Here the "engine" is the NumPy forward in float64 standing in for a real implementation; a
real one would run its own kernels and record each stage with
``pytest_moeparity.trace.Recorder`` (``rec.tap(stage, layer, value)`` applies planted faults and
captures what the plan asks for).

The same registration from an installed package, without a conftest.py, is an entry point::

    # pyproject.toml
    [project.entry-points."moeparity.backends"]
    mine = "my_package.moeparity_engine:SPEC"      # a BackendSpec, or a factory f(model) -> engine
"""
from pytest_moeparity.reference import BACKENDS, NumpyForward


class MyEngine:
    """Stand-in for your engine: the float64 NumPy forward."""

    def __init__(self, model):
        self.forward = NumpyForward(model, name="mine", **BACKENDS["numpy-f64"])

    def trace(self, tokens, plan, *, faults=(), forced_routing=None, layer_inputs=None):
        return self.forward.run(tokens, plan, faults=faults, forced_routing=forced_routing,
                                layer_inputs=layer_inputs).trace


def pytest_moeparity_register_backends(registry):
    registry.register("mine", MyEngine, description="example engine registered from a conftest.py")
