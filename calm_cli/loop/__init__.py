"""calm's MAPE-K loop: monitor.py, analyze.py, plan.py, execute/ (cache, eviction, queue, run) and calm.py, the
thin loop over them; assemble.py puts the real parts together."""
