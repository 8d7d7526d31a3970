"""The toy world as it is loaded: its renderer (scenes, the concepts of interest, captions) and its model classes."""
