"""The datasets params.yaml can name, and the split files every later stage reads."""
