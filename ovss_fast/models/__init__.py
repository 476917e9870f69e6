"""CLIP and affinity models: loading (open_clip, local files, HF), dense-feature presets, affinity sources."""
