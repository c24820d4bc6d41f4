"""Tree-of-Thought reasoning with a group of experts on any causal LM.

- `TreeOfThought(llm, n_experts=3, ...)`: the search (breadth-first with a beam, or depth-first
  with backtracking); `.solve(question)` returns a `ToTResult` (answer, path, tree, counts).
- `experts_prompt(question)`: the single-prompt "three experts" variant, as a template, and
  `ask_experts(llm, question)` to run it (one call, no search) next to the search version.
- `self_consistency(llm, question, n_chains)`: sampled chains and their majority answer, the
  baseline a search is measured against at equal budget.
- `BuiltinLM`, `HFCausalLM`: `llm` adapters for the built-in model and transformers models.
- `ExpertsTask` (any question), `Game24Task` (`qlora_fast.reasoning.game24`), `ArithmeticTask`
  (`qlora_fast.reasoning.arithmetic`: multi-step sums the built-in model can partly do).
"""
from qlora_fast.reasoning.arithmetic import ArithmeticTask
from qlora_fast.reasoning.game24 import Game24Task, verify_expression
from qlora_fast.reasoning.llm import BuiltinLM, HFCausalLM, Usage
from qlora_fast.reasoning.search import Node, ToTResult, TreeOfThought, ask_experts, format_tree, self_consistency
from qlora_fast.reasoning.tasks import ExpertsTask, ReasoningTask, parse_value
from qlora_fast.reasoning.templates import experts_prompt

__all__ = [
    "TreeOfThought", "ToTResult", "Node", "format_tree",
    "ReasoningTask", "ExpertsTask", "Game24Task", "ArithmeticTask", "verify_expression", "parse_value",
    "BuiltinLM", "HFCausalLM", "Usage", "experts_prompt", "ask_experts", "self_consistency",
]
