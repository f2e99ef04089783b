"""Train, predict, evaluate, demo."""
