"""trustgrpo: Flow-GRPO for flow-matching image models. The pure math (sde, advantages, loss) and the training loop (train)."""
