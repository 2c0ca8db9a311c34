"""calm: a MAPE-K orchestrator for a fleet of small language models (CALM, arXiv 2602.03632)."""
