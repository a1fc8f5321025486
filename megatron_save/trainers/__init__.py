"""Training stages: SFT, 1 (Bradley-Terry), 2 (value anchor) and 3 (the SAVE loop, a package), the strategy table
of stage 3's reward model, and what they share (optimizer, one training step, losses, idle-state offload)."""
