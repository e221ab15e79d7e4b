"""Training: the trainer loop, losses, checkpoints and the distributed set-up."""
