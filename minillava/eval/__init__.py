"""Evaluation on the GlobalCom2 paper's benchmarks: `python -m minillava.eval TASK --data DIR --output FILE`.

tasks.py     each benchmark: files, prompts, scoring (a registry: TASKS, @register)
metrics.py   the official scoring rules as pure functions
answers.py   the resumable answers file and the merge of torchrun's per-rank files
files.py     reading question and annotation files with errors naming file and line
distributed.py  rank and world size under torchrun
efficiency.py   what a run cost: per-question costs in, the summary line's efficiency out
runner.py    the command line
"""

from .tasks import TASKS, Question, Task, register

__all__ = ["TASKS", "Question", "Task", "register"]
