"""Experiments beside the library (the learnability ladder): they import only the installed `modeling_clara`."""
