"""The shapes world: clipvqd's embedded, fully synthetic default (see SHAPES.md).

world.py     vocabularies, Attributes, the pure renderer, held-out pairs
captions.py  caption templates with synonyms; parse_prompt
prompts.py   in-distribution and held-out evaluation prompt sets
dataset.py   ShapesImages: the generator's images (no captions, no held-out pairs)
judge.py     the deterministic analyser that scores generated images
train_clip.py, clip_checks.py  the tiny CLIP: its trainer and its measurements
"""
