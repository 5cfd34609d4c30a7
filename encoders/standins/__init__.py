"""Tiny, offline stand-ins in the official file names and layouts (a face pack, PhotoMaker
and StoryMaker checkpoints, synthetic faces), for tests, benchmarks and the demo. They
recognise nobody and produce no likeness."""
