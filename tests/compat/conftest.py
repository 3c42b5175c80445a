"""The seed tutorial runs once, inside its test, not when pytest imports modules for doctests."""

collect_ignore = ["snorkel_seed_tutorial.py"]
