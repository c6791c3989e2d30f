"""Teacher loading, pseudo-labelling and knowledge distillation (KD3 and baselines)."""
