"""Rules: segments and triggers declared in a YAML file, with conditions in CEL.

:mod:`clickpulse.rules.namespace` builds the names a condition can use from a user's state
(``from clickpulse.rules.namespace import namespace``: the function is not re-exported here, so
``clickpulse.rules.namespace`` stays the module);
:mod:`clickpulse.rules.ruleset` loads, validates, compiles (type-checked CEL, never Python
``eval``) and hot-reloads the rules file. Trigger firing, segment membership counts and
engagement scoring build on these.
"""

from .namespace import VARIABLES
from .ruleset import (
    Action,
    EvalError,
    Expr,
    On,
    RulesError,
    RulesFile,
    Ruleset,
    Segment,
    Timeout,
    Trigger,
    activation,
    compile_expression,
    evaluate,
    evaluate_condition,
    load_rules,
    parse_rules,
    render_payload,
)

__all__ = [
    "VARIABLES", "Action", "EvalError", "Expr", "On", "RulesError", "RulesFile", "Ruleset", "Segment", "Timeout",
    "Trigger", "activation", "compile_expression", "evaluate", "evaluate_condition", "load_rules", "parse_rules",
    "render_payload",
]
