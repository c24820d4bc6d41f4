"""What a problem must tell the search: how to ask an expert for the next step, how to read the
step, when a line of steps is a final answer, and how to ask the model to judge a step.

`ReasoningTask` is the interface (every method gets the question and the steps so far on the
line being extended, with the expert that wrote each); `ExpertsTask` is the general one for any
question, where an expert finishes by writing `Answer: ...`. Game of 24 lives in `game24.py`.
"""
import re
from typing import List, Optional, Sequence

from qlora_fast.reasoning.templates import STEP_PROPOSE_PROMPT, STEP_VALUE_PROMPT, experts_prompt, format_transcript

# Words a judge may answer with, and the value each stands for (the Tree-of-Thoughts paper's
# sure/likely/impossible, plus their obvious synonyms).
VALUE_WORDS = {
    "sure": 1.0, "certain": 1.0, "correct": 1.0, "yes": 1.0,
    "likely": 0.5, "maybe": 0.5, "possible": 0.5,
    "impossible": 0.0, "unlikely": 0.0, "wrong": 0.0, "incorrect": 0.0, "no": 0.0,
}
_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def parse_value(text: str) -> Optional[float]:
    """A judgement as a value in [0, 1], or None when the text holds none.

    The first word found in `VALUE_WORDS` wins (sure 1.0, likely 0.5, impossible 0.0, ...);
    otherwise the first number: `a/b` as a fraction, a number in [0, 1] as itself, in (1, 10]
    as a score out of 10, in (10, 100] as a percentage; larger numbers give None.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for word in _WORD.findall(text.lower()):
        if word in VALUE_WORDS:
            return VALUE_WORDS[word]
    match = _NUMBER.search(text)
    if match is None:
        return None
    x = float(match.group(1))
    if match.group(2) is not None:
        denominator = float(match.group(2))
        return min(x / denominator, 1.0) if denominator > 0 else None
    for scale in (1.0, 10.0, 100.0):
        if x <= scale:
            return x / scale
    return None


class ReasoningTask:
    """The interface `TreeOfThought` drives. `steps` are the normalized steps on the line being
    extended (oldest first) and `experts` the expert (1-based) who wrote each one.

    Attributes: `stop` (strings that end one step's generation), `verifies_answers` (True when
    `final_answer` checks answers exactly, so a final answer is accepted without the evaluator).
    """

    stop: Sequence[str] = ("\n",)
    verifies_answers: bool = False

    def propose_prompt(self, question: str, steps: Sequence[str], experts: Sequence[int], expert: int) -> str:
        """The prompt that asks `expert` for its next step."""
        raise NotImplementedError

    def normalize_step(self, question: str, steps: Sequence[str], text: str) -> Optional[str]:
        """The step in canonical form, or None when `text` is not a usable step at all."""
        raise NotImplementedError

    def final_answer(self, question: str, steps: Sequence[str]) -> Optional[str]:
        """The answer when the last step finishes the problem, else None."""
        raise NotImplementedError

    def value_prompt(self, question: str, steps: Sequence[str], experts: Sequence[int]) -> str:
        """The prompt that asks the model to judge the last step."""
        raise NotImplementedError

    def value_prompts(self, question: str, steps: Sequence[str], experts: Sequence[int]) -> List[str]:
        """Every prompt the judge of the last step asks (default: `[value_prompt(...)]`). A task that
        checks a step several ways returns several (and overrides `judge_replies` to read them all);
        they all go into the round's one judge call. An empty list values the step without a call."""
        return [self.value_prompt(question, steps, experts)]

    def judge_replies(self, question: str, steps: Sequence[str], texts: Sequence[str]) -> Optional[float]:
        """The value of the last of `steps` from the model's replies to `value_prompts`, in order
        (default: `judge(question, steps, texts[0])`; None, judged wrong, when nothing was asked)."""
        return self.judge(question, steps, texts[0]) if texts else None

    def parse_value(self, text: str) -> Optional[float]:
        """The model's judgement as a value in [0, 1], or None when unreadable."""
        return parse_value(text)

    def judge(self, question: str, steps: Sequence[str], text: str) -> Optional[float]:
        """The value of the last of `steps` given the model's reply `text` to `value_prompt`
        (default: `parse_value(text)`; a task whose judge needs the step itself overrides this)."""
        return self.parse_value(text)

    def single_prompt(self, question: str, n_experts: int) -> str:
        """The single-prompt variant (`ask_experts`): the whole group in one generation."""
        return experts_prompt(question, n_experts)

    def check_answer(self, question: str, answer: str) -> Optional[str]:
        """The answer as reported when it is acceptable, else None (default: any non-empty text)."""
        answer = answer.strip()
        return answer or None


class ExpertsTask(ReasoningTask):
    """Any question answered in steps by a group of experts (templates in `templates.py`).

    A step is the first non-empty line an expert writes; a step `Answer: X` ends the search
    with the answer `X` (judged by the evaluator like any other step).
    """

    stop = ("\n",)
    verifies_answers = False
    _ANSWER = re.compile(r"^\s*(?:final\s+)?answer\s*[:=]\s*(.+?)\s*$", re.IGNORECASE)

    def __init__(self, n_experts: int = 3):
        self.n_experts = n_experts

    def propose_prompt(self, question, steps, experts, expert):
        return STEP_PROPOSE_PROMPT.format(
            n_experts=self.n_experts, question=question, transcript=format_transcript(experts, steps), expert=expert
        )

    def normalize_step(self, question, steps, text):
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        return lines[0] if lines else None

    def final_answer(self, question, steps):
        if not steps:
            return None
        match = self._ANSWER.match(steps[-1])
        return match.group(1) if match else None

    def value_prompt(self, question, steps, experts):
        return STEP_VALUE_PROMPT.format(question=question, transcript=format_transcript(experts, steps))
