"""Images to labels: the Segmenter and its parts."""
