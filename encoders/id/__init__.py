"""The feed-forward identity encoders (PhotoMaker, StoryMaker), the CLIP vision towers
they read, and the strict reading of their official checkpoints."""
