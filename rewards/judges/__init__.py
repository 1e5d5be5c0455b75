"""Vision-language judges as reward scorers: reading scores out of replies and score-token
probabilities (parse.py, pure) and running the judge in process or behind an OpenAI-compatible
server (backends.py). The FIRM workers built on them live in rewards/firm.py."""
