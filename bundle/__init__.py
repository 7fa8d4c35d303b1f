"""The model bundle: the folder model/ writes and service/ serves. format.py reads and validates
it (docs/model-bundle.md), tokenizer.py is its tokenizer. Training code and the server both
import this package; neither imports the other's."""
