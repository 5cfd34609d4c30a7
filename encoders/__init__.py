"""Photos in, identity artifacts out (the layer above ``vault``; imports torch lazily or not
at all where it can).

- ``encoders.photo``: safe decoding of untrusted photo bytes;
- ``encoders.face``: face analysis with insightface packs (detection, alignment, ArcFace);
- ``encoders.id``: the feed-forward ID encoders (PhotoMaker, StoryMaker) and their CLIP
  vision towers and checkpoints;
- ``encoders.fitting``: artifacts fitted by optimisation (Celeb Basis, LiDB), their jobs
  and their exports;
- ``encoders.standins``: tiny offline stand-ins in the official layouts, for tests and demos;
- ``encoders.enrollment``: photos to a stored, deduplicated identity.
"""
