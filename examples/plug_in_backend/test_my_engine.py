"""Run from this folder:

    pytest --moe-model builtin:tiny --moe-candidate mine                      # passes
    pytest --moe-model builtin:tiny --moe-candidate mine --moe-inject 'scale=2@3:attn_out' \\
           --moe-isolated --moe-report-json report.json                      # fails at layer 3 and says so

The ``moe_parity`` fixture returns the report of the session's reference vs candidate run; its
table (and the bisection sections) is attached to the test's report, its JSON to
--moe-report-json (with a heatmap PNG next to it when matplotlib is installed).
"""


def test_my_engine_matches_the_reference(moe_parity):
    assert moe_parity.ok, moe_parity.render()


def test_router_agrees_everywhere(moe_parity):
    routers = [c for c in moe_parity.cells if c.stage == "moe_router_indices"]
    assert all(c.verdict.value == "Match" for c in routers), moe_parity.render()
