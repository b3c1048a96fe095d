"""The known failure signs of DPO runs, read off the logged metrics. Each sign warns once, naming what it saw.

- Chosen log-probs falling while the margin rises: the policy pushes both completions down, the rejected one
  faster ("likelihood displacement", arXiv 2410.08847): the reward goes up while the chosen answers get less likely.
- Training reward accuracy at 1.0 within the first few hundred pairs: the pairs are separable by something trivial
  (length, formatting, a leaked label) or the learning rate is far too high; either way DPO learns a shortcut.
- Diversity of eval generations collapsing (distinct-2 under half its first value): mode collapse, typical of a
  small beta or a long run.
"""

from __future__ import annotations

EARLY_PAIRS = 300
"""'The first few hundred pairs' of the accuracy sign."""
CHOSEN_DROP_NATS = 1.0
CHOSEN_DROP_SHARE = 0.1
"""Chosen log-probs count as falling once they are more than max(1 nat, 10%) below their first logged value (per
pair): DPO lowers them a little in most healthy runs."""
DIVERSITY_FLOOR = 0.5
"""Eval distinct-2 below this share of its first value counts as collapsed."""


class FailureSigns:
    def __init__(self) -> None:
        self.first_train: dict[str, float] | None = None
        self.first_distinct_2: float | None = None
        self.warned: set[str] = set()

    def train(self, step: int, metrics: dict[str, float], pairs_seen: int) -> list[str]:
        warnings = []
        if self.first_train is None:
            self.first_train = metrics
        first = self.first_train
        chosen_drop = first["logps/chosen"] - metrics["logps/chosen"]
        allowed_drop = max(CHOSEN_DROP_NATS, CHOSEN_DROP_SHARE * abs(first["logps/chosen"]))
        if chosen_drop > allowed_drop and metrics["rewards/margins"] > first["rewards/margins"]:
            warnings += self._once(
                "chosen_falling",
                f"warning: step {step}: chosen log-probs fell from {first['logps/chosen']:.2f} to "
                f"{metrics['logps/chosen']:.2f} while the margin rose from {first['rewards/margins']:.3f} to "
                f"{metrics['rewards/margins']:.3f}: the policy makes both answers less likely, the rejected faster. "
                "Consider loss.rpo_alpha (an NLL term on chosen), a lower optim.lr or a larger loss.beta",
            )
        if pairs_seen <= EARLY_PAIRS and metrics["rewards/accuracies"] >= 1.0:
            warnings += self._once(
                "early_accuracy",
                f"warning: step {step}: training reward accuracy is 1.00 after only {pairs_seen} pairs: the pairs may "
                "be separable by something trivial (length, formatting, a leaked label) or optim.lr is too high",
            )
        return warnings

    def eval(self, step: int, metrics: dict[str, float]) -> list[str]:
        distinct_2 = metrics.get("generations/distinct_2")
        if distinct_2 is None:
            return []
        if self.first_distinct_2 is None:
            self.first_distinct_2 = distinct_2
            return []
        if distinct_2 < DIVERSITY_FLOOR * self.first_distinct_2:
            return self._once(
                "diversity",
                f"warning: step {step}: eval generations' distinct-2 fell from {self.first_distinct_2:.3f} to "
                f"{distinct_2:.3f}: the policy is collapsing onto few outputs. Consider a larger loss.beta, a lower "
                "optim.lr or an earlier checkpoint",
            )
        return []

    def _once(self, sign: str, message: str) -> list[str]:
        if sign in self.warned:
            return []
        self.warned.add(sign)
        return [message]
