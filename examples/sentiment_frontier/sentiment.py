"""A deterministic sentiment score for short stories: positive words minus negative words, per 10 words.

Stands in for the DPO paper's sentiment classifier (its Figure 2 used a fine-tuned RoBERTa): simple, exact, and
fast enough to label thousands of samples on a CPU. Usable as `dpo-scale eval` reward:
generation.reward_fn=examples/sentiment_frontier/sentiment.py:score
"""

from __future__ import annotations

import re

POSITIVE = frozenset(
    """happy happily glad joy joyful love loved loves loving smile smiled smiles smiling laugh laughed laughing fun
    funny good great nice kind kindly friend friends friendly best beautiful pretty wonderful amazing excited
    exciting proud brave safe thank thanks thankful hug hugged hugs play played playing enjoy enjoyed share shared
    sharing help helped helping cheer cheered delicious sweet warm gentle together yay hooray treasure win won
    favorite special bright sunny calm""".split()
)
NEGATIVE = frozenset(
    """sad sadly cry cried crying cries tears angry mad upset bad scared afraid fear frightened hurt hurts pain
    broke broken break lost lose alone lonely sick ugly mean naughty dark storm scary worried worry sorry shout
    shouted yell yelled fight fought bite bit danger dangerous stuck fall fell trouble wrong sore grumpy cold
    rude hate hated monster accident dirty messy""".split()
)
WORD = re.compile(r"[a-z']+")


def sentiment(text: str) -> float:
    """(positive - negative words) per 10 words; 0 for no words."""
    words = WORD.findall(text.lower())
    if not words:
        return 0.0
    balance = sum(word in POSITIVE for word in words) - sum(word in NEGATIVE for word in words)
    return 10.0 * balance / len(words)


def score(prompts: list[str], completions: list[str]) -> list[float]:
    """The reward function signature `dpo-scale eval` calls: one score per completion (the prompt is ignored)."""
    return [sentiment(completion) for completion in completions]
