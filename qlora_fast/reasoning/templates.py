"""Prompt templates: the single-prompt "group of experts" from the seed, and the step-wise
propose/value prompts `ExpertsTask` uses for any question.

The single-prompt variant puts the whole group in one generation (no search, no evaluator); the
search version (`TreeOfThought`) asks for one step at a time and lets an evaluator send experts
away. Both are here so they can be compared on the same model.
"""

EXPERTS_PROMPT = """\
Imagine {n_words} different experts are independently solving this question. All experts will \
write down 1 step of their thinking, then share it with the group. Then all experts will go on \
to the next step, etc. If any expert realises they're wrong at any point then they leave. \
Each step is one line "Expert <number>: <step>". When an expert reaches the answer, they write \
"Answer: " followed by it.
The question is: {question}
"""

STEP_PROPOSE_PROMPT = """\
{n_experts} experts are solving a question together. Each writes one step of their thinking and \
shares it with the group; an expert who realises they are wrong leaves. An expert who has the \
answer writes "Answer: " followed by it.
Question: {question}
{transcript}Expert {expert}:"""

STEP_VALUE_PROMPT = """\
Question: {question}
{transcript}Is the last step correct and does it lead towards the answer? \
Reply with one word: sure, likely or impossible.
Judgement:"""

_NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
}


def experts_prompt(question: str, n_experts: int = 3) -> str:
    """The single-prompt Tree-of-Thought template: `n_experts` experts reason step by step in
    one generation and leave when they realise they are wrong.

    Raises TypeError when `question` is not a str, ValueError when `n_experts < 1`.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    n_words = _NUMBER_WORDS.get(n_experts, str(n_experts))
    return EXPERTS_PROMPT.format(n_words=n_words, question=question)


def format_transcript(experts, steps) -> str:
    """`Expert k: step` lines (each ending in a newline) for the steps shared so far."""
    return "".join(f"Expert {e}: {s}\n" for e, s in zip(experts, steps))
