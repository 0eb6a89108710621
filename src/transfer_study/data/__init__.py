"""The datasets params.yaml can name, their readers, and the split files every later stage reads."""
