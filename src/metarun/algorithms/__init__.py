"""The meta-learning algorithms: base.py holds the contract, and each other file one method (or one
family's shared machinery), its paper cited in the class docstring."""
