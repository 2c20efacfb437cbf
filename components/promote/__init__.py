"""The promote step: the registered version becomes `champion` only if it passes the recipe's gates."""
