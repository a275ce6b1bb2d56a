"""Scaling-law harness (docs/design.md, "Scaling harness"; docs/scaling.md).

    budget.py   compute budget -> training steps (OmegaConf resolvers `steps_for_budget`,
                `sweep_values`, registered when this package is imported)
    result.py   the result row (result.json) each sweep run writes, and the skip of finished runs
    report.py   `python -m vsa.scaling.report SWEEP_DIR`: envelopes, power-law fits, IsoFLOP
                curves, the compute multiplier of VSA over full attention, plots + report.md

Importing this package is cheap (OmegaConf only); torch and Lightning load on first use.
"""

from vsa.scaling.budget import register_resolvers, steps_for_budget

register_resolvers()

__all__ = ["register_resolvers", "steps_for_budget"]
