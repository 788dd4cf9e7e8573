"""Mixed batches on a server that serves adapters unmerged: every answer compared with the same request sent
alone, and each difference told apart as a *leak* (the answer carries what only another served name learned)
or *drift* (it differs for numerical reasons: greedy decoding can flip a near-tie when the batch shape changes).

`solo[name][prompt]` is the answer of `name` alone; `mixed` the (name, prompt, answer) of the batched run.
An answer leaks when it is another name's solo answer to that prompt, or starts more like another name's
solo answer than like its own (a run that began with another adapter's fact and drifted later is still a leak).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class MixedResult:
    total: int = 0
    equal: int = 0
    leaks: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.equal}/{self.total} equal to their solo answer, {len(self.leaks)} leaks, {len(self.drift)} drift"


def leaked_from(name: str, prompt: str, answer: str, solo: dict[str, dict[str, str]]) -> str | None:
    """The other name whose learned answer `answer` carries (its very answer first, else the one it starts
    most like, if more like it than like its own), or None."""
    own = solo[name][prompt]
    # only what another name answers differently can be told apart
    others = {other: answers[prompt] for other, answers in solo.items() if other != name and answers[prompt] != own}
    for other, theirs in others.items():
        if answer == theirs:
            return other
    best = max(others, key=lambda other: _common_prefix(answer, others[other]), default=None)
    if best is not None and _common_prefix(answer, others[best]) > _common_prefix(answer, own):
        return best
    return None


def classify(mixed: list[tuple[str, str, str]], solo: dict[str, dict[str, str]]) -> MixedResult:
    result = MixedResult(total=len(mixed))
    for name, prompt, answer in mixed:
        if answer == solo[name][prompt]:
            result.equal += 1
            continue
        other = leaked_from(name, prompt, answer, solo)
        line = f"{name} on {prompt!r}: {answer!r} (alone: {solo[name][prompt]!r})"
        if other:
            result.leaks.append(f"{line} carries {other}'s {solo[other][prompt]!r}")
        else:
            result.drift.append(line)
    return result


def run_mixed(
    ask: Callable[[str, str], str], names: list[str], prompts: list[str], rounds: int, workers: int
) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, str]]]:
    """(solo answers, mixed answers): each (name, prompt) asked alone once, then `rounds` times every pair
    at once from `workers` threads (interleaved, so base and adapter requests share batches)."""
    solo = {name: {prompt: ask(name, prompt) for prompt in prompts} for name in names}
    jobs = [(name, prompt) for _ in range(rounds) for prompt in prompts for name in names]
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    return solo, [(name, prompt, answer) for (name, prompt), answer in zip(jobs, answers, strict=True)]
