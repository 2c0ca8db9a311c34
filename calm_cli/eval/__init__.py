"""Evaluation: the pinned tasks (tasks.py), grading answers (evaluate.py), running model-written code contained
(sandbox.py, sandbox_child.py) and calibrating the knowledge base (profile.py, `calm profile`)."""
