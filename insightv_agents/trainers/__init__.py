"""Training: dataset builders, SFT of both agents, and iterative DPO (see the trainers issue)."""
