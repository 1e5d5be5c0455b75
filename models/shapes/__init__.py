"""The embedded demo's domain, in a room of its own: procedural scenes, captions and the renderer
(scenes.py), the classical checker behind the shapes_geneval reward (checker.py), and the script
that pretrains the small SD3 committed under models/pretrained/shapes-sd3 (pretrain.py)."""
